"""Sub-batch ascent (`gr_ascent_fraction` f < 1): pass 1 on the first ⌈f·B⌉ samples of a micro-batch of B.

Pass 1 gives only the direction of the perturbation ε = r·g1/‖g1‖, and a direction is scale-free: how the
sub-batch's loss is normalized (by its own size, by the whole micro-batch's `num_items_in_batch`, by the
accumulation steps) does not change it. Pass 2 runs on the whole micro-batch at θ + ε and gives the update; at
α = 1 (SAM) that is g2 alone, so a GR step costs about 1 + f passes. This is SAM's m-sharpness, and the sub-batch
ascent Bahri et al. (ACL 2022) used for SAM on T5.

A step whose α_t ≠ 1 (a λ-warmup step) needs the whole micro-batch's g1 for its (1 − α_t)·g1 term: pass 1 then
takes the whole micro-batch (`pass_fraction`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from .schedule import GR, StepPlan

# Inputs of sequences packed into one row: their samples are not rows, so they cannot be sliced by sample.
PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens", "max_length_q", "max_length_k", "seq_idx")
_BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values")  # where B is read from first, when present


def pass_fraction(plan: StepPlan, fraction: float) -> float:
    """The share of the micro-batch pass 1 takes on a step planned as `plan`: `fraction` on a GR step with α_t = 1,
    else 1 (α_t ≠ 1 mixes the whole micro-batch's g1 into the update)."""
    return fraction if plan.kind == GR and plan.alpha == 1.0 else 1.0


def ascent_size(batch_size: int, fraction: float) -> int:
    """⌈f·B⌉, at least 1 (rounded first, so that 0.1·30 is 3, not 4)."""
    return max(1, math.ceil(round(fraction * batch_size, 9)))


def ascent_inputs(inputs: Mapping[str, Any], fraction: float) -> dict[str, Any]:
    """The inputs of pass 1: every tensor with a first dimension sliced to its first ⌈f·B⌉ rows.

    B is the first dimension of `input_ids` (else `inputs_embeds`, `pixel_values`, else the first tensor input).
    Values that are not tensors, and 0-dim tensors, pass unchanged.

    Raises:
        ValueError: when the inputs cannot be sliced by sample: a packed-sequence key (`cu_seq_lens_q`, ...), a
            tensor whose first dimension is not B, or no tensor with a first dimension at all.
    """
    packed = [key for key in PACKED_KEYS if inputs.get(key) is not None]
    if packed:
        raise ValueError(
            f"gr_ascent_fraction={fraction} < 1 runs pass 1 on the first samples of each micro-batch, but the inputs "
            f"hold sequences packed into rows ({', '.join(packed)}), which cannot be sliced by sample: use "
            "gr_ascent_fraction=1, or a collator that pads instead of packing."
        )
    tensors = {key: value for key, value in inputs.items() if isinstance(value, torch.Tensor) and value.dim() > 0}
    if not tensors:
        raise ValueError(
            f"gr_ascent_fraction={fraction} < 1 slices the tensor inputs by sample, but the inputs hold none with a "
            f"batch dimension (keys: {', '.join(map(str, inputs)) or 'none'}): use gr_ascent_fraction=1."
        )
    key = next((k for k in _BATCH_KEYS if k in tensors), next(iter(tensors)))
    batch = tensors[key].shape[0]
    other = [f"{k!r} has shape {tuple(v.shape)}" for k, v in tensors.items() if v.shape[0] != batch]
    if other:
        raise ValueError(
            f"gr_ascent_fraction={fraction} < 1 slices every tensor input along its first dimension, the micro-batch "
            f"size B = {batch} (of {key!r}), but {', '.join(other)}: such inputs cannot be sliced by sample. Use "
            "gr_ascent_fraction=1, or inputs whose first dimension is the sample."
        )
    size = ascent_size(batch, fraction)
    if size == batch:
        warnings.warn(
            f"gr_ascent_fraction={fraction} leaves pass 1 the whole micro-batch of B = {batch} (⌈f·B⌉ = B): no "
            "saving. Use larger micro-batches (sequences packed into one row cannot be sliced by sample).",
            UserWarning,
            stacklevel=2,
        )
    return {k: value[:size] if k in tensors else value for k, value in inputs.items()}

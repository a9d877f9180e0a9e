"""Loading a Trainer checkpoint's weights back into a live model, through transformers' own key conversion.

transformers 5.x renames some models' parameters at load time (ViT: `encoder.layer.N.attention.attention.query`
→ `layers.N.attention.q_proj`) and renames them back when saving. The stock `Trainer._load_from_checkpoint`
and `_load_best_model` call `model.load_state_dict` on the saved file without that conversion, so the renamed
weights are silently skipped (a "missing keys" warning) and a resumed ViT continues from its fresh init.
Loading with `from_pretrained` applies the conversion.
"""

from __future__ import annotations

import os

import torch
from transformers import PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME


def has_full_weights(folder: str) -> bool:
    """Whether `folder` holds full-model safetensors weights (not an adapter, FSDP or DeepSpeed checkpoint)."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME))


def load_converted_weights(model: torch.nn.Module, folder: str) -> bool:
    """Copy the weights saved in `folder` into `model` with the checkpoint key conversion applied.

    Returns False (and changes nothing) when `model` is not a plain `PreTrainedModel` or the folder holds no
    full safetensors weights, so the caller can fall back to the stock loader.
    """
    if not isinstance(model, PreTrainedModel) or not has_full_weights(folder):
        return False
    loaded = type(model).from_pretrained(folder, config=model.config, dtype=next(model.parameters()).dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    return True

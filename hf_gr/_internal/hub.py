"""Model cards that record gradient regularization, for the output directory and for `push_to_hub`.

The Trainer writes its card (`Trainer.create_model_card`, also called by `Trainer.push_to_hub` just before the
upload); `GRMixin.create_model_card` then adds to it, through huggingface_hub's `ModelCard`/`ModelCardData`:
an `hf_gr` metadata block with the GR settings (λ, r, α, the warmup strategy and its length W, the method, the
cheaper modes; per range of optimizer steps when a resume changed them), the dataset, the base model and the eval
results; the tags `gradient-regularization` and `hf_gr`; and a "Gradient regularization" section.
"""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from transformers import TrainerState

from ..arguments import GRArguments, optimizer_name
from . import record

GR_TAGS = ("gradient-regularization", "hf_gr")
_TIMINGS = ("runtime", "per_second")
_HEADER = """## Gradient regularization

Trained with hf_gr's gradient regularization, L + λ·‖∇L‖₂ (Zhao, Zhang & Hu, "When Will Gradient Regularization
Be Harmful?", ICML 2024):

"""
_SETTINGS = """- λ = {gr_lambda}, r = {gr_r} (α = λ/r = {alpha}), method: {gr_method}, first term: {gr_first_term}
- GR warmup: {gr_warmup_strategy} over W = {gr_warmup_steps} optimizer steps
- cheaper modes: interval k = {gr_interval}, probability p = {gr_probability} (ramped to {gr_probability_end} by the
  last step; None: constant), reuse = {gr_reuse}, sub-batch ascent fraction f = {gr_ascent_fraction}, ascent
  direction: {gr_ascent_direction}
"""
_RANGES = "- GR settings by range of optimizer steps (changed on resume; steps not listed were not recorded):\n"
_RANGE = (
    "  - steps {first_step}–{last_step}: λ = {gr_lambda}, r = {gr_r} (α = {alpha}), method: {gr_method}, first term: "
    "{gr_first_term}, GR warmup: {gr_warmup_strategy} over W = {gr_warmup_steps}, interval k = {gr_interval}, "
    "probability p = {gr_probability} (ramped to {gr_probability_end}), reuse = {gr_reuse}, sub-batch ascent "
    "fraction f = {gr_ascent_fraction}, ascent direction: {gr_ascent_direction}, synced perturbation = "
    "{gr_sync_perturbation}\n"
)
_RUN = """- optimizer: {optimizer}, learning rate {learning_rate}, weight decay {weight_decay}, {max_steps} steps
- dataset: {dataset}; base model: {base}
"""


def gr_card_metadata(
    args: GRArguments,
    state: TrainerState,
    warmup_steps: int | None,
    dataset: str | None = None,
    base_model: str | None = None,
    segments: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The `hf_gr` metadata block: GR settings, W, the dataset, the base model and the latest eval results.

    `segments` (`record`) lists the settings each range of optimizer steps ran with, as `gr_segments`; the
    top-level settings are those of the last range.
    """
    eval_results: dict[str, Any] = {}
    for entry in state.log_history:
        if any(key.startswith("eval_") for key in entry):
            eval_results = {
                k[len("eval_") :]: v for k, v in entry.items() if k.startswith("eval_") and not k.endswith(_TIMINGS)
            }
    return {
        "gr_lambda": args.gr_lambda,
        "gr_r": args.gr_r,
        "gr_alpha": args.gr_alpha,
        "gr_warmup_strategy": args.gr_warmup_strategy,
        "gr_warmup_steps": warmup_steps,
        "gr_method": args.gr_method,
        "gr_first_term": args.gr_first_term,
        "gr_interval": args.gr_interval,
        "gr_probability": args.gr_probability,
        "gr_reuse": args.gr_reuse,
        "gr_ascent_fraction": args.gr_ascent_fraction,
        "gr_probability_end": args.gr_probability_end,
        "gr_ascent_direction": args.gr_ascent_direction,
        "optimizer": optimizer_name(args),
        "learning_rate": getattr(args, "learning_rate", None),
        "weight_decay": getattr(args, "weight_decay", None),
        "max_steps": state.max_steps or getattr(args, "max_steps", None),
        "dataset": dataset,
        "base_model": base_model,
        "eval_results": {k: float(v) if isinstance(v, float) else v for k, v in eval_results.items()},
        "gr_segments": [_ordered(s) for s in segments or [] if s["last_step"] >= s["first_step"]],
    }


def _ordered(segment: dict[str, Any]) -> dict[str, Any]:
    """A segment's keys in one order (a checkpoint's JSON stores them sorted): the steps, then the settings."""
    order = ("first_step", "last_step", *record.SETTINGS)
    return {**{k: segment[k] for k in order if k in segment}, **{k: v for k, v in segment.items() if k not in order}}


def add_gr_to_model_card(path: str, metadata: dict[str, Any]) -> ModelCard:
    """Add the `hf_gr` metadata, the GR tags and the GR section to the model card at `path` (created if absent)."""
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    data = card.data
    data.hf_gr = metadata
    data.tags = list(dict.fromkeys([*(data.tags or []), *GR_TAGS]))
    data.library_name = data.library_name or "transformers"
    if metadata.get("base_model") and not data.base_model:
        data.base_model = metadata["base_model"]
    if metadata.get("dataset") and not data.datasets:
        data.datasets = [metadata["dataset"]]
    ranges = metadata.get("gr_segments") or []
    if len(ranges) > 1 or (ranges and ranges[0]["first_step"] > 1):
        older = {"gr_ascent_fraction": 1.0, "gr_probability_end": None, "gr_ascent_direction": "batch"}  # before them
        settings = _RANGES + "".join(_RANGE.format(alpha=f"{r['gr_lambda'] / r['gr_r']:.4g}", **{**older, **r})
                                     for r in ranges)  # fmt: skip
    else:
        settings = _SETTINGS.format(alpha=f"{metadata['gr_alpha']:.4g}", **metadata)
    base = metadata["base_model"] or "none (trained from scratch)"
    section = _HEADER + settings + _RUN.format(base=base, **metadata)
    results = [f"{k} {v:.4g}" for k, v in metadata["eval_results"].items() if k in ("accuracy", "error_rate")]
    if results:
        section += f"- eval: {', '.join(results)}\n"
    card.text = card.text.rstrip() + "\n\n" + section
    card.save(path)
    return card

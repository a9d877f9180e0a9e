"""Model cards that record gradient regularization, for the output directory and for `push_to_hub`.

The Trainer writes its card (`Trainer.create_model_card`, also called by `Trainer.push_to_hub` just before the
upload); `GRTrainer.create_model_card` then adds to it, in the YAML metadata, an `hf_gr` block with the GR
settings (λ, r, α, the warmup strategy and its length W, the method), the dataset, the base model and the eval
results, plus the tags `gradient-regularization` and `hf_gr`, and a short "Gradient regularization" section.
"""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import ModelCard
from transformers import TrainerState

from .arguments import GRTrainingArguments
from .callbacks import resolve_warmup_steps

GR_TAGS = ("gradient-regularization", "hf_gr")
_SECTION_TITLE = "## Gradient regularization"
_TIMINGS = ("runtime", "per_second")
# What `Trainer.create_model_card` writes for a model with no base (its `_name_or_path` is empty).
_NO_BASE_TEXT = "This model is a fine-tuned version of [](https://huggingface.co/) on"


def gr_card_metadata(
    args: GRTrainingArguments, state: TrainerState, dataset: str | None = None, base_model: str | None = None
) -> dict[str, Any]:
    """The `hf_gr` metadata block: GR settings, W, the dataset, the base model and the latest eval results."""
    max_steps = state.max_steps or args.max_steps
    eval_results = {}
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
        "gr_warmup_steps": resolve_warmup_steps(args, max_steps) if max_steps > 0 else args.gr_warmup_steps,
        "gr_method": args.gr_method,
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "max_steps": max_steps,
        "dataset": dataset,
        "base_model": base_model,
        "eval_results": {k: _plain(v) for k, v in eval_results.items()},
    }


def add_gr_to_model_card(path: str, metadata: dict[str, Any]) -> ModelCard:
    """Add the `hf_gr` metadata, the GR tags and a GR section to the model card at `path` (created if absent)."""
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard("---\n---\n")
    card.data.hf_gr = metadata
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *GR_TAGS]))
    card.data.library_name = card.data.library_name or "transformers"
    if metadata.get("base_model") and not card.data.base_model:
        card.data.base_model = metadata["base_model"]
    if metadata.get("dataset") and not card.data.datasets:
        card.data.datasets = [metadata["dataset"]]
    section = _gr_section(metadata)
    text = card.text.replace(_NO_BASE_TEXT, "This model was trained from scratch on")
    if _SECTION_TITLE in text:
        text = text[: text.index(_SECTION_TITLE)].rstrip() + "\n"
    card.text = text.rstrip() + "\n\n" + section
    card.save(path)
    return card


def _gr_section(m: dict[str, Any]) -> str:
    results = ", ".join(f"{k} {_fmt(v)}" for k, v in m["eval_results"].items() if k in ("accuracy", "error_rate"))
    return (
        f"{_SECTION_TITLE}\n\n"
        "Trained with hf_gr's gradient regularization, L + λ·‖∇L‖₂ "
        '(Zhao, Zhang & Hu, "When Will Gradient Regularization Be Harmful?", ICML 2024):\n\n'
        f"- λ = {m['gr_lambda']}, r = {m['gr_r']} (α = λ/r = {_fmt(m['gr_alpha'])}), method: {m['gr_method']}\n"
        f"- GR warmup: {m['gr_warmup_strategy']} over W = {m['gr_warmup_steps']} optimizer steps\n"
        f"- optimizer: {m['optimizer']}, learning rate {m['learning_rate']}, weight decay {m['weight_decay']}, "
        f"{m['max_steps']} steps\n"
        f"- dataset: {m['dataset']}; base model: {m['base_model'] or 'none (trained from scratch)'}\n"
        + (f"- eval: {results}\n" if results else "")
    )


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, float) else value

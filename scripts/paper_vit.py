"""The paper's from-scratch CIFAR ViTs, `--config_overrides` parsing, and its decoupled-weight-decay RMSProp.

Zhao, Zhang & Hu (ICML 2024) train ViTs on 32×32 CIFAR images with patch 4 (64 tokens + CLS), pre-LayerNorm,
dropout 0.1, attention dropout 0.1, a learned position embedding and a zero-initialized classification head:

| name   | width | depth | heads | MLP  |
|--------|-------|-------|-------|------|
| vit-ti | 192   | 12    | 3     | 768  |
| vit-s  | 384   | 12    | 6     | 1536 |
| vit-b  | 768   | 12    | 12    | 3072 |

`transformers`' ViT is pre-LN with a learned position embedding, so these are plain `ViTConfig`s.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from transformers import ViTConfig, ViTForImageClassification

PAPER_VIT_CONFIGS: dict[str, dict[str, int]] = {
    "vit-ti": {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768},
    "vit-s": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536},
    "vit-b": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}
_PAPER_COMMON: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 4,
    "num_channels": 3,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}


def paper_vit_config(name: str, id2label: dict[int, str], config_overrides: str | None = None) -> ViTConfig:
    """The paper's `ViTConfig` for `name` (vit-ti, vit-s, vit-b) with the dataset's labels.

    Args:
        name (`str`): one of `PAPER_VIT_CONFIGS`.
        id2label (`dict[int, str]`): the class names, index → name.
        config_overrides (`str`, *optional*): "key=value,key=value" applied last, e.g. "hidden_size=64".
    """
    if name not in PAPER_VIT_CONFIGS:
        raise ValueError(f"--model_config must be one of {', '.join(PAPER_VIT_CONFIGS)}, got {name!r}.")
    config = ViTConfig(
        **_PAPER_COMMON,
        **PAPER_VIT_CONFIGS[name],
        num_labels=len(id2label),
        id2label=dict(id2label),
        label2id={label: i for i, label in id2label.items()},
    )
    if config_overrides:
        apply_config_overrides(config, config_overrides)
    if config.image_size % config.patch_size:
        raise ValueError(
            f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}; "
            "fix it with --config_overrides."
        )
    return config


def apply_config_overrides(config: ViTConfig, overrides: str) -> None:
    """Apply "key=value,key=value" to `config` in place, naming any key the config does not have."""
    pairs = [item.strip() for item in overrides.split(",") if item.strip()]
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--config_overrides expects 'key=value' pairs separated by commas, got {pair!r}.")
        if not hasattr(config, key.strip()):
            raise ValueError(f"--config_overrides: {type(config).__name__} has no field {key.strip()!r}.")
    try:
        config.update_from_string(",".join(p.replace(" ", "") for p in pairs))
    except (ValueError, TypeError) as error:
        raise ValueError(f"--config_overrides {overrides!r}: {error}") from error


def paper_vit(config: ViTConfig) -> ViTForImageClassification:
    """A freshly initialized ViT with the paper's zero-initialized classification head."""
    model = ViTForImageClassification(config)
    zero_head_(model)
    return model


def zero_head_(model: ViTForImageClassification) -> None:
    """Zero the classifier's weight and bias (the paper's head initialization)."""
    with torch.no_grad():
        model.classifier.weight.zero_()
        if model.classifier.bias is not None:
            model.classifier.bias.zero_()


class DecoupledRMSprop(torch.optim.RMSprop):
    """RMSProp with decoupled weight decay (θ ← θ·(1 − lr·wd) before the RMSProp update), the paper's RMSProp.

    `torch.optim.RMSprop`'s `weight_decay` adds wd·θ to the gradient (L2, coupled to the adaptive scaling);
    the paper decays the weights directly, as AdamW does. Paper settings: alpha (decay) 0.9, eps 1e-8,
    momentum 0.

    Args:
        params: parameters or parameter groups (each group may set its own `weight_decay`).
        lr (`float`): learning rate.
        weight_decay (`float`): decoupled weight decay.
        **kwargs: the other `torch.optim.RMSprop` arguments (alpha, eps, momentum, centered, ...).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0, **kwargs: Any) -> None:
        params = list(params)
        groups = [dict(g) for g in params] if params and isinstance(params[0], dict) else [{"params": params}]
        for group in groups:
            group["decoupled_weight_decay"] = group.pop("weight_decay", weight_decay)
        super().__init__(groups, lr=lr, weight_decay=0.0, **kwargs)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            decay = group.get("decoupled_weight_decay", 0.0)
            if decay:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    torch._foreach_mul_(params, 1.0 - group["lr"] * decay)
        return super().step(closure)

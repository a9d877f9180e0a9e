"""`GRTrainingArguments`: the gradient-regularization settings as `TrainingArguments` fields.

GR (Zhao, Zhang & Hu, "When Will Gradient Regularization Be Harmful?", ICML 2024) minimizes
L(θ) + λ·‖∇L(θ)‖₂ with the two-pass gradient g = (1 − α)·g1 + α·g2, where g1 = ∇L(θ),
g2 = ∇L(θ + r·g1/‖g1‖) and α = λ/r. λ = r is SAM; λ = 0 is plain training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

GR_WARMUP_STRATEGIES = ("none", "lambda", "r", "zero")
GR_METHODS = ("finite_difference", "exact")


@dataclass
class GRTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the GR fields; every field works from the command line and from YAML.

    Args:
        gr_lambda (`float`, defaults to 0.1):
            λ, the weight of the gradient-norm penalty L + λ·‖∇L‖₂. 0 turns GR off (plain single-pass steps).
        gr_r (`float`, defaults to 0.1):
            r, the radius of the finite-difference perturbation ε = r·g1/‖g1‖. α = λ/r mixes the two passes;
            λ = r (α = 1) is SAM. The paper's CIFAR recipes use r = 0.1, α = 1.
        gr_warmup_strategy (`str`, defaults to "zero"):
            How GR is relaxed during the LR warmup: "zero" (λ = 0, plain steps), "lambda" (α ramps 0 → α),
            "r" (r ramps 0 → r) or "none". The paper finds "zero" best with Adam/RMSProp.
        gr_warmup_steps (`int`, *optional*):
            Length W of the GR warmup in optimizer steps; None uses the LR warmup length of the run.
        gr_method (`str`, defaults to "finite_difference"):
            "finite_difference" is the two-pass Hessian-free gradient; "exact" is the double-backprop gradient
            ∇L + λ·H∇L/‖∇L‖, for verification and small models (single process only).
        gr_sync_perturbation (`bool`, defaults to False):
            Under data parallelism, perturb with the replica-averaged g1 (one extra all-reduce per GR
            micro-batch) instead of each replica's own g1.
        gr_diagnostics_steps (`int`, defaults to 0):
            Every N optimizer steps, log ‖g1‖, ‖g2‖, cos(g1, g2) and the adaptive-LR statistics; 0 is off.
    """

    gr_lambda: float = field(
        default=0.1,
        metadata={"help": "λ, the weight of the gradient-norm penalty L + λ·||∇L||₂ (0 turns GR off)."},
    )
    gr_r: float = field(
        default=0.1,
        metadata={"help": "r, the perturbation radius; α = λ/r mixes the passes, λ = r is SAM (paper: r = 0.1)."},
    )
    gr_warmup_strategy: str = field(
        default="zero",
        metadata={
            "help": "GR warmup during the LR warmup: zero (λ = 0), lambda (ramp α), r (ramp r) or none.",
            "choices": list(GR_WARMUP_STRATEGIES),
        },
    )
    gr_warmup_steps: int | None = field(
        default=None,
        metadata={"help": "GR warmup length W in optimizer steps (default: the LR warmup length)."},
    )
    gr_method: str = field(
        default="finite_difference",
        metadata={
            "help": "finite_difference (two passes) or exact (double backprop, for verification).",
            "choices": list(GR_METHODS),
        },
    )
    gr_sync_perturbation: bool = field(
        default=False,
        metadata={"help": "Perturb with the replica-averaged g1 (one extra all-reduce per GR micro-batch)."},
    )
    gr_diagnostics_steps: int = field(
        default=0,
        metadata={"help": "Log GR and adaptive-optimizer diagnostics every N optimizer steps (0 = off)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_finite_number(self.gr_lambda) or self.gr_lambda < 0:
            raise ValueError(f"gr_lambda must be a finite number >= 0 (0 turns GR off), got {self.gr_lambda!r}.")
        if not _is_finite_number(self.gr_r) or self.gr_r <= 0:
            raise ValueError(f"gr_r must be a finite number > 0 (the paper uses 0.1), got {self.gr_r!r}.")
        if self.gr_warmup_strategy not in GR_WARMUP_STRATEGIES:
            raise ValueError(
                f"gr_warmup_strategy must be one of {', '.join(GR_WARMUP_STRATEGIES)}, "
                f"got {self.gr_warmup_strategy!r}."
            )
        if self.gr_method not in GR_METHODS:
            raise ValueError(f"gr_method must be one of {', '.join(GR_METHODS)}, got {self.gr_method!r}.")
        if self.gr_warmup_steps is not None and (
            isinstance(self.gr_warmup_steps, bool)
            or int(self.gr_warmup_steps) != self.gr_warmup_steps
            or self.gr_warmup_steps < 0
        ):
            raise ValueError(
                f"gr_warmup_steps must be an integer >= 0 or None (the LR warmup), got {self.gr_warmup_steps!r}."
            )
        if self.gr_diagnostics_steps < 0:
            raise ValueError(f"gr_diagnostics_steps must be >= 0 (0 = off), got {self.gr_diagnostics_steps!r}.")

    @property
    def gr_alpha(self) -> float:
        """α = λ/r, the weight of the perturbed gradient g2."""
        return self.gr_lambda / self.gr_r


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

"""`GRArguments`: the gradient-regularization settings, as a dataclass that combines with any `TrainingArguments`.

GR (Zhao, Zhang & Hu, "When Will Gradient Regularization Be Harmful?", ICML 2024) minimizes
L(θ) + λ·‖∇L(θ)‖₂ with the two-pass gradient g = (1 − α)·g1 + α·g2, where g1 = ∇L(θ),
g2 = ∇L(θ + r·g1/‖g1‖) and α = λ/r. λ = r is SAM; λ = 0 is plain training.

    @dataclass
    class GRSFTConfig(GRArguments, SFTConfig): ...

`GRTrainingArguments` is `GRArguments` + `TrainingArguments`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

__all__ = ["GRArguments", "GRTrainingArguments"]

GR_WARMUP_STRATEGIES = ("none", "lambda", "r", "zero")
GR_METHODS = ("finite_difference", "exact")
GR_FIRST_TERMS = ("raw", "normalized")
GR_ASCENT_DIRECTIONS = ("batch", "previous_step")


@dataclass
class GRArguments:
    """The GR fields and their validation; put it first among the bases of a `TrainingArguments` subclass.

    Args:
        gr_lambda (`float`, defaults to 0.1):
            λ, the weight of the gradient-norm penalty L + λ·‖∇L‖₂ (0 turns GR off: plain single-pass steps).
        gr_r (`float`, defaults to 0.1):
            r, the radius of the perturbation ε = r·g1/‖g1‖; α = λ/r mixes the two passes, and λ = r (α = 1) is
            SAM. The paper's CIFAR recipes use r = 0.1, α = 1.
        gr_warmup_strategy (`str`, defaults to "zero"):
            How GR is relaxed during the LR warmup: zero (λ = 0, plain steps), lambda (α ramps 0 → α), r (r ramps
            0 → r) or none. The paper finds zero best with Adam/RMSProp.
        gr_warmup_steps (`int`, *optional*):
            Length W of the GR warmup in optimizer steps (default: the LR warmup length of the run).
        gr_method (`str`, defaults to "finite_difference"):
            finite_difference (two passes) or exact (double backprop ∇L + λ·H∇L/‖∇L‖, for verification on small
            models, single process).
        gr_sync_perturbation (`bool`, defaults to False):
            Under data parallelism, perturb with the replica-averaged g1 (one extra all-reduce per GR micro-batch)
            instead of each replica's own g1.
        gr_interval (`int`, defaults to 1):
            k: only steps t that are multiples of k may be GR steps (composer's SAM interval).
        gr_probability (`float`, defaults to 1.0):
            p: such a step is a GR step with probability p, drawn from the seed and the step (the official code's
            hybrid mode, RST, arXiv 2203.09962); the others are single-pass steps.
        gr_reuse (`bool`, defaults to False):
            Single-pass steps between GR steps add the GR correction kept from the last GR step, g + ρ·‖g‖·u
            (LookSAM, arXiv 2203.02714); needs gr_interval > 1 or gr_probability < 1 to save anything.
        gr_first_term (`str`, defaults to "raw"):
            raw mixes g1 as the paper writes it, (1 − α)·g1 + α·g2; normalized mixes g1/‖g1‖ as the official code
            does by default. They agree at α = 1.
        gr_diagnostics_steps (`int`, defaults to 0):
            Log ‖g1‖, ‖g2‖, cos(g1, g2) and the adaptive-LR statistics every N optimizer steps (0 = off).
        gr_ascent_fraction (`float`, defaults to 1.0):
            f: pass 1 runs on the first ⌈f·B⌉ samples of each micro-batch of B and gives only the perturbation's
            direction; pass 2 runs on all B at θ + ε and gives the update, so a step costs about 1 + f passes
            (sub-batch ascent, SAM's m-sharpness; Bahri et al., ACL 2022). f < 1 needs α = 1 (gr_lambda = gr_r:
            the update is g2 alone), gr_first_term raw, gr_method finite_difference and no gr_reuse; on the
            steps of a λ-warmup (α_t < 1) pass 1 takes the whole micro-batch.
        gr_probability_end (`float`, *optional*):
            The end value of p: p ramps linearly from gr_probability at the first step with λ_t > 0 to this value at
            the last step of training (G-RST, arXiv 2203.09962); None keeps p constant.
        gr_ascent_direction (`str`, defaults to "batch"):
            batch: ε from this step's own g1 (two passes). previous_step: ε = r·D/‖D‖ with D the gradient the
            optimizer applied at the last step, so a GR step takes one pass (AsyncSAM, arXiv 2503.11147); needs
            α = 1 (gr_lambda = gr_r), gr_ascent_fraction 1, no gr_reuse and gr_method finite_difference. A GR step
            without a D (the first, or after a skipped fp16 step) runs two passes.
    """

    gr_lambda: float = field(
        default=0.1,
        metadata={"help": "λ, the weight of the gradient-norm penalty L + λ·‖∇L‖₂ (0 turns GR off: plain single-pass "
                  "steps)."},
    )  # fmt: skip
    gr_r: float = field(
        default=0.1,
        metadata={"help": "r, the radius of the perturbation ε = r·g1/‖g1‖; α = λ/r mixes the two passes, and λ = r "
                  "(α = 1) is SAM. The paper's CIFAR recipes use r = 0.1, α = 1."},
    )  # fmt: skip
    gr_warmup_strategy: str = field(
        default="zero",
        metadata={
            "help": "How GR is relaxed during the LR warmup: zero (λ = 0, plain steps), lambda (α ramps 0 → α), r "
            "(r ramps 0 → r) or none. The paper finds zero best with Adam/RMSProp.",
            "choices": list(GR_WARMUP_STRATEGIES),
        },
    )
    gr_warmup_steps: int | None = field(
        default=None,
        metadata={"help": "Length W of the GR warmup in optimizer steps (default: the LR warmup length of the run)."},
    )
    gr_method: str = field(
        default="finite_difference",
        metadata={
            "help": "finite_difference (two passes) or exact (double backprop ∇L + λ·H∇L/‖∇L‖, for verification on "
            "small models, single process).",
            "choices": list(GR_METHODS),
        },
    )
    gr_sync_perturbation: bool = field(
        default=False,
        metadata={"help": "Under data parallelism, perturb with the replica-averaged g1 (one extra all-reduce per GR "
                  "micro-batch) instead of each replica's own g1."},
    )  # fmt: skip
    gr_interval: int = field(
        default=1,
        metadata={"help": "k: only steps t that are multiples of k may be GR steps (composer's SAM interval)."},
    )
    gr_probability: float = field(
        default=1.0,
        metadata={"help": "p: such a step is a GR step with probability p, drawn from the seed and the step (the "
                  "official code's hybrid mode, RST, arXiv 2203.09962); the others are single-pass steps."},
    )  # fmt: skip
    gr_reuse: bool = field(
        default=False,
        metadata={"help": "Single-pass steps between GR steps add the GR correction kept from the last GR step, "
                  "g + ρ·‖g‖·u (LookSAM, arXiv 2203.02714); needs gr_interval > 1 or gr_probability < 1 to save "
                  "anything."},
    )  # fmt: skip
    gr_first_term: str = field(
        default="raw",
        metadata={
            "help": "raw mixes g1 as the paper writes it, (1 − α)·g1 + α·g2; normalized mixes g1/‖g1‖ as the official "
            "code does by default. They agree at α = 1.",
            "choices": list(GR_FIRST_TERMS),
        },
    )
    gr_diagnostics_steps: int = field(
        default=0,
        metadata={"help": "Log ‖g1‖, ‖g2‖, cos(g1, g2) and the adaptive-LR statistics every N optimizer steps (0 = "
                  "off)."},
    )  # fmt: skip
    gr_ascent_fraction: float = field(
        default=1.0,
        metadata={"help": "f: pass 1 runs on the first ⌈f·B⌉ samples of each micro-batch of B and gives only the "
                  "perturbation's direction; pass 2 runs on all B at θ + ε and gives the update, so a step costs "
                  "about 1 + f passes (sub-batch ascent, SAM's m-sharpness; Bahri et al., ACL 2022). f < 1 needs "
                  "α = 1 (gr_lambda = gr_r: the update is g2 alone), gr_first_term raw, gr_method "
                  "finite_difference and no gr_reuse; on the steps of a λ-warmup (α_t < 1) pass 1 takes the whole "
                  "micro-batch."},
    )  # fmt: skip
    gr_probability_end: float | None = field(
        default=None,
        metadata={"help": "The end value of p: p ramps linearly from gr_probability at the first step with λ_t > 0 "
                  "to this value at the last step of training (G-RST, arXiv 2203.09962); None keeps p constant."},
    )  # fmt: skip
    gr_ascent_direction: str = field(
        default="batch",
        metadata={
            "help": "batch: ε from this step's own g1 (two passes). previous_step: ε = r·D/‖D‖ with D the gradient "
            "the optimizer applied at the last step, so a GR step takes one pass (AsyncSAM, arXiv 2503.11147); needs "
            "α = 1 (gr_lambda = gr_r), gr_ascent_fraction 1, no gr_reuse and gr_method finite_difference. A GR step "
            "without a D (the first, or after a skipped fp16 step) runs two passes.",
            "choices": list(GR_ASCENT_DIRECTIONS),
        },
    )  # fmt: skip

    def __new__(cls, *args: Any, **kwargs: Any) -> GRArguments:
        _check_is_a_dataclass(cls)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        validate_gr_arguments(self)
        self.warn_if_alpha_extrapolates()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Validate the GR fields after whichever `__post_init__` a subclass resolves to (some bases do not call
        `super().__post_init__()`, so `class A(TrainingArguments, GRArguments)` would otherwise skip it)."""
        super().__init_subclass__(**kwargs)
        post_init = cls.__post_init__
        if getattr(post_init, "_validates_gr", False):
            return

        def __post_init__(self: Any) -> None:
            post_init(self)
            validate_gr_arguments(self)
            self.warn_if_alpha_extrapolates()

        __post_init__._validates_gr = True  # type: ignore[attr-defined]
        cls.__post_init__ = __post_init__  # type: ignore[method-assign]

    def warn_if_alpha_extrapolates(self, stacklevel: int = 4) -> None:
        """Warn when α = λ/r > 2: the first term's weight 1 − α < −1 puts the step far beyond g2 (the paper: α ≤ 1).

        Called when the arguments are built, and again by `GRMixin` when it takes them (λ or r may have been set
        since): each α is warned about once per arguments object.
        """
        alpha = self.gr_lambda / self.gr_r
        if alpha > 2 and self._warned_alpha != alpha:
            self._warned_alpha = alpha
            warnings.warn(
                f"gr_lambda/gr_r = α = {alpha:.4g} > 2: the GR gradient (1 − α)·g1 + α·g2 weights g1 by 1 − α = "
                f"{1 - alpha:.4g} < −1, which extrapolates far past g2 (the paper uses α ≤ 1; α = 1 is SAM). Check "
                "gr_lambda and gr_r.",
                UserWarning,
                stacklevel=stacklevel,  # 4: the line that built the arguments (through __init__ and __post_init__)
            )

    @property
    def gr_alpha(self) -> float:
        """α = λ/r, the weight of the perturbed gradient g2."""
        return self.gr_lambda / self.gr_r


GRArguments._warned_alpha = None  # the α last warned about (not a field: set per instance when it warns)
GRArguments.__post_init__._validates_gr = True  # type: ignore[attr-defined]


@dataclass
class GRTrainingArguments(GRArguments, TrainingArguments):
    """`TrainingArguments` plus the GR fields of `GRArguments`; every field works from the command line and YAML."""


def validate_gr_arguments(args: Any) -> None:
    """Refuse bad GR values with an error that names the field and its allowed values."""
    if not _is_finite_number(args.gr_lambda) or args.gr_lambda < 0:
        raise ValueError(f"gr_lambda must be a finite number >= 0 (0 turns GR off), got {args.gr_lambda!r}.")
    if not _is_finite_number(args.gr_r) or args.gr_r <= 0:
        raise ValueError(f"gr_r must be a finite number > 0 (the paper uses 0.1), got {args.gr_r!r}.")
    _check_choice("gr_warmup_strategy", args.gr_warmup_strategy, GR_WARMUP_STRATEGIES)
    _check_choice("gr_method", args.gr_method, GR_METHODS)
    _check_choice("gr_first_term", args.gr_first_term, GR_FIRST_TERMS)
    _check_choice("gr_ascent_direction", getattr(args, "gr_ascent_direction", "batch"), GR_ASCENT_DIRECTIONS)
    if args.gr_warmup_steps is not None and (not _is_integer(args.gr_warmup_steps) or args.gr_warmup_steps < 0):
        raise ValueError(
            f"gr_warmup_steps must be an integer >= 0 or None (the LR warmup), got {args.gr_warmup_steps!r}."
        )
    if not _is_integer(args.gr_interval) or args.gr_interval < 1:
        raise ValueError(f"gr_interval must be an integer >= 1 (1: every step may be a GR step), got "
                         f"{args.gr_interval!r}.")  # fmt: skip
    if not _is_finite_number(args.gr_probability) or not 0 < args.gr_probability <= 1:
        raise ValueError(f"gr_probability must be in (0, 1] (1: every candidate step is a GR step), got "
                         f"{args.gr_probability!r}.")  # fmt: skip
    if args.gr_reuse and args.gr_method == "exact":
        raise ValueError("gr_reuse needs gr_method='finite_difference': the reused correction is the two-pass one.")
    if not _is_integer(args.gr_diagnostics_steps) or args.gr_diagnostics_steps < 0:
        raise ValueError(f"gr_diagnostics_steps must be an integer >= 0 (0 = off), got {args.gr_diagnostics_steps!r}.")
    _validate_cheaper_every_step(args)
    _validate_previous_step(args)


def _validate_previous_step(args: Any) -> None:
    """Refuse what the one-pass step cannot do: it needs α = 1 and the whole batch's pass at θ + ε."""
    if getattr(args, "gr_ascent_direction", "batch") != "previous_step":
        return
    why = "gr_ascent_direction='previous_step' takes one pass, at θ + r·D/‖D‖, and uses its gradient as the update"
    if args.gr_lambda not in (0, args.gr_r):
        raise ValueError(f"{why}: it needs α = 1 (gr_lambda == gr_r), got gr_lambda={args.gr_lambda}, "
                         f"gr_r={args.gr_r}, because (1 − α)·g1 would need g1 at θ, a second pass.")  # fmt: skip
    if args.gr_ascent_fraction < 1:
        raise ValueError(f"{why}: gr_ascent_fraction={args.gr_ascent_fraction} < 1 has no pass 1 to shrink here; "
                         "use gr_ascent_fraction=1.")  # fmt: skip
    if args.gr_reuse:
        raise ValueError(f"{why}: gr_reuse keeps g_GR − g1, which needs g1 at θ; use gr_reuse=False.")
    if args.gr_method != "finite_difference":
        raise ValueError(f"{why}: gr_method={args.gr_method!r} differentiates through ∇L at θ; use "
                         "gr_method='finite_difference'.")  # fmt: skip


def _validate_cheaper_every_step(args: Any) -> None:
    """Refuse a bad `gr_ascent_fraction` or `gr_probability_end`, and sub-batch ascent where it would be wrong."""
    f = getattr(args, "gr_ascent_fraction", 1.0)
    if not _is_finite_number(f) or not 0 < f <= 1:
        raise ValueError(f"gr_ascent_fraction must be in (0, 1] (1: pass 1 on the whole micro-batch), got {f!r}.")
    end = getattr(args, "gr_probability_end", None)
    if end is not None and (not _is_finite_number(end) or not 0 < end <= 1):
        raise ValueError(f"gr_probability_end must be in (0, 1] or None (a constant gr_probability), got {end!r}.")
    if f == 1:
        return
    # The sub-batch gives only the direction of ε; any other use of g1 needs the whole micro-batch's g1.
    if args.gr_lambda not in (0, args.gr_r):
        raise ValueError(
            f"gr_ascent_fraction={f} < 1 needs gr_lambda == gr_r (α = 1, SAM) or gr_lambda = 0, got "
            f"gr_lambda={args.gr_lambda}, gr_r={args.gr_r}: with α ≠ 1 the update (1 − α)·g1 + α·g2 needs g1 of "
            "the whole micro-batch, which a sub-batch pass 1 does not compute."
        )
    if args.gr_method != "finite_difference":
        raise ValueError(f"gr_ascent_fraction={f} < 1 needs gr_method='finite_difference' (the exact method has no "
                         "separate ascent pass).")  # fmt: skip
    if args.gr_first_term != "raw":
        raise ValueError(f"gr_ascent_fraction={f} < 1 needs gr_first_term='raw' (at α = 1 both first terms agree).")
    if args.gr_reuse:
        raise ValueError(
            f"gr_ascent_fraction={f} < 1 cannot be combined with gr_reuse: LookSAM's kept correction is "
            "g_GR − g1 made orthogonal to g1, and a sub-batch g1 differs from the micro-batch's by its sampling "
            "noise and loss normalization, so the correction would measure those instead of the GR term."
        )


def optimizer_name(args: Any) -> str:
    """The `optim` of `TrainingArguments` as a plain string ("adamw_torch", "rmsprop", ...)."""
    return str(getattr(args.optim, "value", args.optim))


def _check_is_a_dataclass(cls: type) -> None:
    """Refuse a class combining `GRArguments` with another arguments dataclass without `@dataclass` of its own: its
    inherited `__init__` knows only one base's fields (`output_dir` is refused, or the GR flags are ignored)."""
    owner = next(c for c in cls.__mro__ if "__init__" in vars(c))
    if "__dataclass_fields__" not in vars(owner):
        return  # an `__init__` written by hand
    known = {f.name for f in dataclasses.fields(owner) if f.init}
    bases = [c for c in cls.__mro__ if "__dataclass_fields__" in vars(c)]
    missing = sorted({f.name for c in bases for f in dataclasses.fields(c) if f.init} - known)
    if missing:
        raise TypeError(
            f"{cls.__name__} combines {', '.join(c.__name__ for c in bases if c is not owner)} with {owner.__name__} "
            f"but is not a dataclass itself, so its __init__ lacks {', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}: add @dataclass above `class {cls.__name__}(...)`."
        )


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}.")


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

"""The paper's GR warmup strategies as `TrainerCallback`s, tied to the LR warmup.

Zhao, Zhang & Hu (ICML 2024) show that with adaptive optimizers and LR warmup, GR applied from the first
step can hurt; relaxing it during the warmup fixes that. With W the warmup length and
f(t) = min(1, t / W) for the optimizer step that starts at global step t (W = 0: f = 1):

- λ-warmup (`LambdaWarmupCallback`): r fixed, α_t = α·f(t), so λ_t = α_t·r ramps 0 → λ;
- r-warmup (`RWarmupCallback`): α fixed, r_t = r·f(t), so λ_t = α·r_t ramps too;
- zero-warmup (`ZeroWarmupCallback`, the paper's best): λ_t = 0 for t < W (plain steps), full GR from W.

The schedule is a pure function of the global step, so a resumed run continues it exactly. Callbacks never
see the trainer: `GRTrainer` hands each one the `GRStepState` it reads at every step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class GRStepState:
    """The GR coefficients the next optimizer step uses, shared by `GRTrainer` and its callbacks.

    Args:
        gr_lambda (`float`): λ for the step (0: a plain single-pass step).
        gr_r (`float`): r for the step (0: a plain single-pass step).
        record_diagnostics (`bool`): whether the step records `diagnostics` (set by `GRDiagnosticsCallback`).
        diagnostics (`dict`): while recording, each measurement's per-micro-batch values; after the step, the
            averaged values that the next training log entry carries.
    """

    gr_lambda: float
    gr_r: float
    record_diagnostics: bool = False
    diagnostics: dict[str, Any] = field(default_factory=dict)


def warmup_fraction(global_step: int, warmup_steps: int) -> float:
    """f(t) = min(1, t / W); 1 when there is no warmup (W = 0)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, global_step / warmup_steps)


def resolve_warmup_steps(args: TrainingArguments, max_steps: int, warmup_steps: int | None = None) -> int:
    """W: an explicit length, else `args.gr_warmup_steps`, else the run's LR warmup (steps or ratio)."""
    if warmup_steps is not None:
        return int(warmup_steps)
    if getattr(args, "gr_warmup_steps", None) is not None:
        return int(args.gr_warmup_steps)
    return args.get_warmup_steps(max_steps)


class GRWarmupCallback(TrainerCallback):
    """Base of the warmup strategies: sets λ_t and r_t in the bound `GRStepState` before every step.

    Args:
        warmup_steps (`int`, *optional*):
            W in optimizer steps; None uses `gr_warmup_steps`, else the LR warmup of the run.
    """

    strategy: str = "none"

    def __init__(self, warmup_steps: int | None = None) -> None:
        self.warmup_steps = warmup_steps
        self.step_state: GRStepState | None = None

    def bind(self, step_state: GRStepState) -> None:
        """Give the callback the state the trainer reads (done by `GRTrainer`)."""
        self.step_state = step_state

    def coefficients(self, gr_lambda: float, gr_r: float, fraction: float) -> tuple[float, float]:
        """(λ_t, r_t) for the base (λ, r) at warmup fraction f(t)."""
        raise NotImplementedError

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        """Warn when there is nothing to warm up over (W = 0: full GR from the first step)."""
        if resolve_warmup_steps(args, state.max_steps, self.warmup_steps) == 0:
            logger.warning(
                "%s-warmup has W = 0 (no LR warmup and no gr_warmup_steps): full GR from the first step.",
                self.strategy,
            )
        return control

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        """Set λ_t and r_t for the optimizer step that starts at `state.global_step`."""
        if self.step_state is None:
            raise RuntimeError(
                f"{type(self).__name__} is not bound to a GRTrainer: pass it to GRTrainer(callbacks=...)."
            )
        fraction = warmup_fraction(state.global_step, resolve_warmup_steps(args, state.max_steps, self.warmup_steps))
        self.step_state.gr_lambda, self.step_state.gr_r = self.coefficients(args.gr_lambda, args.gr_r, fraction)
        return control


class LambdaWarmupCallback(GRWarmupCallback):
    """λ-warmup: r fixed, α_t = α·f(t), so λ_t = α_t·r = λ·f(t)."""

    strategy = "lambda"

    def coefficients(self, gr_lambda: float, gr_r: float, fraction: float) -> tuple[float, float]:
        return gr_lambda * fraction, gr_r


class RWarmupCallback(GRWarmupCallback):
    """r-warmup: α fixed, r_t = r·f(t), so λ_t = α·r_t."""

    strategy = "r"

    def coefficients(self, gr_lambda: float, gr_r: float, fraction: float) -> tuple[float, float]:
        r_t = gr_r * fraction
        return (gr_lambda / gr_r) * r_t, r_t


class ZeroWarmupCallback(GRWarmupCallback):
    """zero-warmup: λ_t = 0 (a plain single-pass step) while t < W, full GR from t = W."""

    strategy = "zero"

    def coefficients(self, gr_lambda: float, gr_r: float, fraction: float) -> tuple[float, float]:
        return (gr_lambda if fraction >= 1.0 else 0.0), gr_r


WARMUP_CALLBACKS: dict[str, type[GRWarmupCallback]] = {
    cls.strategy: cls for cls in (LambdaWarmupCallback, RWarmupCallback, ZeroWarmupCallback)
}

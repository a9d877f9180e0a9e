"""The paper's GR warmup strategies as `TrainerCallback`s, tied to the LR warmup.

Zhao, Zhang & Hu (ICML 2024) show that with adaptive optimizers and LR warmup, GR applied from the first
step can hurt; relaxing it during the warmup fixes that. With W the warmup length and f(t) = min(1, t / W)
for the optimizer step that starts at LR-schedule step t (W = 0: f = 1):

- λ-warmup (`LambdaWarmupCallback`): r fixed, α_t = α·f(t), so λ_t = α_t·r ramps 0 → λ;
- r-warmup (`RWarmupCallback`): α fixed, r_t = r·f(t), so λ_t = α·r_t ramps too;
- zero-warmup (`ZeroWarmupCallback`, the paper's best): λ_t = 0 for t < W (plain steps), full GR from W.

A callback only chooses the schedule: `GRMixin` asks the one it holds for (λ_t, r_t) when each optimizer
step starts, reading λ and r from the arguments every time. Pass one in `callbacks=[...]` to choose the strategy
(and W) in code; `gr_warmup_strategy` adds the matching one otherwise.
"""

from __future__ import annotations

from transformers import TrainerCallback

from ._internal import schedule

__all__ = ["GRWarmupCallback", "LambdaWarmupCallback", "RWarmupCallback", "ZeroWarmupCallback"]


class GRWarmupCallback(TrainerCallback):
    """Base of the warmup strategies: a subclass names its `strategy` (or defines its own `coefficients`).

    Args:
        warmup_steps (`int`, *optional*):
            W in optimizer steps; None uses `gr_warmup_steps`, else the LR warmup of the run.
    """

    strategy: str | None = None

    def __init__(self, warmup_steps: int | None = None) -> None:
        if warmup_steps is not None and (not isinstance(warmup_steps, int) or warmup_steps < 0):
            raise ValueError(f"warmup_steps must be an integer >= 0 or None (the LR warmup), got {warmup_steps!r}.")
        self.warmup_steps = warmup_steps

    def coefficients(self, gr_lambda: float, gr_r: float, fraction: float) -> tuple[float, float]:
        """(λ_t, r_t) for the base (λ, r) at warmup fraction f(t)."""
        if self.strategy is None:
            raise NotImplementedError(f"{type(self).__name__} names no strategy and defines no coefficients.")
        return schedule.warmup_coefficients(self.strategy, gr_lambda, gr_r, fraction)


class LambdaWarmupCallback(GRWarmupCallback):
    """λ-warmup: r fixed, α_t = α·f(t), so λ_t = α_t·r = λ·f(t)."""

    strategy = "lambda"


class RWarmupCallback(GRWarmupCallback):
    """r-warmup: α fixed, r_t = r·f(t), so λ_t = α·r_t."""

    strategy = "r"


class ZeroWarmupCallback(GRWarmupCallback):
    """zero-warmup: λ_t = 0 (a plain single-pass step) while t < W, full GR from t = W."""

    strategy = "zero"


WARMUP_CALLBACKS: dict[str, type[GRWarmupCallback]] = {
    cls.strategy: cls for cls in (LambdaWarmupCallback, RWarmupCallback, ZeroWarmupCallback)
}

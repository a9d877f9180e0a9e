"""Which optimizer steps are GR steps, and with which λ and r: pure functions of the step, shared by every loop.

The GR warmup (Zhao, Zhang & Hu, ICML 2024) ties GR to the LR warmup of length W. With f(t) = min(1, t / W)
for the optimizer step that starts at LR-schedule step t (W = 0: f = 1):

- λ-warmup ("lambda"): r fixed, α_t = α·f(t), so λ_t = λ·f(t);
- r-warmup ("r"): α fixed, r_t = r·f(t), so λ_t = α·r_t;
- zero-warmup ("zero"): λ_t = 0 for t < W (plain steps), full GR from t = W;
- "none": full GR from the first step.

A step is *eligible* when λ_t > 0 and r_t > 0. The cheaper modes then pick the GR steps among them: a step t is
a GR step when t % k == 0 (`gr_interval`, composer's SAM interval) and u(seed, t) < p (`gr_probability`, the
official code's hybrid mode). u is a hash of (seed, t): the same on every replica and after a resume, and it
consumes no RNG, so dropout streams are untouched. The other eligible steps are plain steps, or reuse steps
with `gr_reuse` (LookSAM).

With `gr_probability_end` p ramps (G-RST, arXiv 2203.09962): p_t = p + (p_end − p)·clip((t − t0)/(T − 1 − t0), 0, 1)
from the first eligible step t0 to the last step T − 1 of a run of T optimizer steps (`ramped_probability`), and
the draw is u(seed, t) < p_t: still a pure function of the step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.optim import lr_scheduler as torch_schedulers

GR, PLAIN, REUSE = "gr", "plain", "reuse"
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step does.

    Args:
        kind (`str`): "gr" (two passes), "plain" (one pass) or "reuse" (one pass plus the kept GR correction).
        gr_lambda (`float`): λ_t of a GR step (0 for the others: what the step applied).
        gr_r (`float`): r_t, the radius after the warmup ramp.
    """

    kind: str
    gr_lambda: float
    gr_r: float

    @property
    def alpha(self) -> float:
        """α_t = λ_t / r_t (0 for a step that is not a GR step)."""
        return self.gr_lambda / self.gr_r if self.kind == GR else 0.0


def warmup_fraction(step: int, warmup_steps: int) -> float:
    """f(t) = min(1, t / W); 1 when there is no warmup (W = 0)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def warmup_coefficients(strategy: str, gr_lambda: float, gr_r: float, fraction: float) -> tuple[float, float]:
    """(λ_t, r_t) of a warmup strategy at warmup fraction f(t)."""
    if strategy == "lambda":
        return gr_lambda * fraction, gr_r
    if strategy == "r":
        r_t = gr_r * fraction
        return (gr_lambda / gr_r) * r_t, r_t
    if strategy == "zero":
        return (gr_lambda if fraction >= 1.0 else 0.0), gr_r
    if strategy == "none":
        return gr_lambda, gr_r
    raise ValueError(f"gr_warmup_strategy must be one of none, lambda, r, zero, got {strategy!r}.")


def uniform(seed: int, step: int) -> float:
    """A uniform draw in [0, 1) that depends only on (seed, step): SplitMix64 of the pair, top 53 bits."""
    z = ((seed & _MASK64) * 0x9E3779B97F4A7C15 + (step & _MASK64) + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


def first_eligible_step(coefficients: Callable[[float], tuple[float, float]], warmup_steps: int) -> int:
    """t0: the first LR-schedule step whose warmed-up (λ_t, r_t) = `coefficients(f(t))` are both > 0.

    From t = W on f(t) = 1, so the search ends there (W when even the full (λ, r) is not eligible).
    """
    for step in range(max(warmup_steps, 0) + 1):
        gr_lambda, gr_r = coefficients(warmup_fraction(step, warmup_steps))
        if gr_lambda > 0.0 and gr_r > 0.0:
            return step
    return max(warmup_steps, 0)


def ramped_probability(start: float, end: float | None, step: int, first_step: int, total_steps: int) -> float:
    """p_t of step `step`: `start` up to the first eligible step t0 = `first_step`, then linear to `end` at the
    run's last step T − 1 (`total_steps` = T), `end` after it; `start` when `end` is None (no ramp)."""
    if end is None:
        return start
    span = total_steps - 1 - first_step
    if span <= 0:
        return start if step < first_step else end
    return start + (end - start) * min(1.0, max(0.0, (step - first_step) / span))


def plan_step(
    gr_lambda: float,
    gr_r: float,
    step: int,
    *,
    interval: int = 1,
    probability: float = 1.0,
    reuse: bool = False,
    seed: int = 0,
) -> StepPlan:
    """The plan of optimizer step `step` (global, from 0) given the warmed-up λ_t and r_t."""
    if gr_lambda <= 0.0 or gr_r <= 0.0:
        return StepPlan(PLAIN, 0.0, gr_r)
    if step % interval == 0 and (probability >= 1.0 or uniform(seed, step) < probability):
        return StepPlan(GR, gr_lambda, gr_r)
    return StepPlan(REUSE if reuse else PLAIN, 0.0, gr_r)


def scheduler_step(scheduler: Any, default: int) -> int:
    """How many times `scheduler` has stepped (its `last_epoch`), else `default` (no scheduler, or a plateau one).

    The Trainer does not step the scheduler on an optimizer step that the fp16 scaler skipped, so this count, not
    the global step, is where the LR warmup stands.
    """
    if isinstance(scheduler, torch_schedulers.LRScheduler) and not isinstance(
        scheduler, torch_schedulers.ReduceLROnPlateau
    ):
        return int(scheduler.last_epoch)
    return default


def scheduler_warmup_steps(scheduler: Any) -> int | None:
    """The warmup length of a scheduler, where it can be read; None where it cannot.

    transformers' `get_*_schedule_with_warmup` (a `LambdaLR` over a partial with `num_warmup_steps`), torch's
    `LinearLR` ramping up (`total_iters`), and a `SequentialLR` that starts with one of these.
    """
    if isinstance(scheduler, torch_schedulers.SequentialLR):
        first = scheduler._schedulers[0]
        return scheduler_warmup_steps(first)
    if isinstance(scheduler, torch_schedulers.LambdaLR):
        found = {f.keywords.get("num_warmup_steps") for f in scheduler.lr_lambdas if isinstance(f, functools.partial)}
        found.discard(None)
        return int(found.pop()) if len(found) == 1 else None
    if isinstance(scheduler, torch_schedulers.LinearLR) and scheduler.start_factor < scheduler.end_factor:
        return int(scheduler.total_iters)
    return None


Coefficients = Callable[[float, float, float], tuple[float, float]]  # (λ, r, f(t)) → (λ_t, r_t)


class StepPlanner:
    """The plan phase of a GR step: what each optimizer step does, made once at its first micro-batch.

    (λ_t, r_t) come from the warmup at LR-schedule step t, then `gr_interval`, `gr_probability` (ramped with
    `gr_probability_end`) and `gr_reuse` pick a GR, plain or reuse step. λ, r and the modes are read from `args` at
    every plan, so a change of the arguments (a resume, `hyperparameter_search`) takes effect at the next step.

    Args:
        args (`GRArguments`): the GR settings.
        seed (`int`): the seed of the `gr_probability` draws.
        coefficients (`Callable`, *optional*): (λ, r, f(t)) → (λ_t, r_t), a warmup callback's `coefficients`
            (default: those of `args.gr_warmup_strategy`).
    """

    def __init__(self, args: Any, seed: int = 0, coefficients: Coefficients | None = None) -> None:
        self.args, self.seed, self.custom_coefficients = args, seed, coefficients
        self._first_eligible: tuple[tuple[Any, ...], int] | None = None  # (what t0 depends on, t0)

    def coefficients(self, fraction: float) -> tuple[float, float]:
        """(λ_t, r_t) at warmup fraction f(t)."""
        a = self.args
        if self.custom_coefficients is not None:
            return self.custom_coefficients(a.gr_lambda, a.gr_r, fraction)
        return warmup_coefficients(a.gr_warmup_strategy, a.gr_lambda, a.gr_r, fraction)

    def probability(self, step: int, warmup_steps: int, total_steps: int | None) -> float:
        """p_t: `gr_probability`, ramped from the first eligible step to the run's last with `gr_probability_end`."""
        a = self.args
        if a.gr_probability_end is None:
            return a.gr_probability
        if total_steps is None:
            raise ValueError("gr_probability_end ramps p up to the last step of training: give the run's total steps.")
        return ramped_probability(a.gr_probability, a.gr_probability_end, step, self.first_eligible(warmup_steps),
                                  total_steps)  # fmt: skip

    def first_eligible(self, warmup_steps: int) -> int:
        """t0, the first LR-schedule step on which the warmup lets GR run (`first_eligible_step`), kept until λ, r,
        the strategy or W change."""
        a = self.args
        key = (warmup_steps, a.gr_lambda, a.gr_r, a.gr_warmup_strategy, self.custom_coefficients)
        if self._first_eligible is None or self._first_eligible[0] != key:
            self._first_eligible = (key, first_eligible_step(self.coefficients, warmup_steps))
        return self._first_eligible[1]

    def plan(self, step: int, warmup_step: int, warmup_steps: int, total_steps: int | None = None) -> StepPlan:
        """The plan of optimizer step `step` (from 0), the LR schedule at step `warmup_step` of a warmup of
        `warmup_steps` (W), in a run of `total_steps` optimizer steps (needed with `gr_probability_end`)."""
        gr_lambda, gr_r = self.coefficients(warmup_fraction(warmup_step, warmup_steps))
        a = self.args
        return plan_step(
            gr_lambda, gr_r, step, interval=a.gr_interval, reuse=a.gr_reuse, seed=self.seed,
            probability=self.probability(step, warmup_steps, total_steps),
        )  # fmt: skip

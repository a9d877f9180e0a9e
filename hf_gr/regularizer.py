"""`GradientRegularizer`: the GR gradient of one micro-batch, added to `.grad`, for any training loop.

A custom loop's `backward(loss_fn)` drives the same three objects as `GRMixin`: the step's plan
(`schedule.StepPlanner`), its passes (`passes.GRPasses`, which combine the gradient with
`combine`) and the record (the step counters and the reuse direction in `state_dict`). What this module adds
is the loop's bookkeeping the Trainer otherwise does: which micro-batch ends an optimizer step, and where the LR
warmup stands.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler as torch_schedulers

from ._internal import gradient, schedule
from ._internal.passes import GRPasses
from ._internal.schedule import GR, StepPlan
from .arguments import GRArguments

__all__ = ["GradientRegularizer"]


class GradientRegularizer:
    """Gradient regularization (GR) or SAM in your own loop: `backward(loss_fn)` in place of `loss.backward()`.

    `backward` adds the micro-batch's GR gradient to `.grad`; the loop's clipping, optimizer step and scheduler
    run unchanged. Which optimizer steps are GR steps, and with which λ_t and r_t, follows the warmup strategy and
    the cheaper modes of `args`, counted in optimizer steps, as `GRTrainer` counts them. So the regularizer must
    know which micro-batch ends an optimizer step:

    - with an `accelerator`, its `sync_gradients` (set by `accelerator.accumulate`) says so;
    - without one (a plain PyTorch loop, DDP or FSDP2), pass `gradient_accumulation_steps=k` (every k-th call of
      `backward` ends a step), or `backward(..., sync_gradients=...)` per call (for a last, shorter step);
      with neither, every call of `backward` is one optimizer step (no accumulation).

    The warmup's t is the LR schedule's step count: pass `lr_scheduler=` and t is its count (W is then read from
    it when `gr_warmup_steps` is unset), as in `GRTrainer`; without it, t is the optimizer steps taken, less those
    the accelerator's fp16 scaler skipped.

    Example (a plain PyTorch loop with gradient accumulation 2, zero-warmup over the scheduler's 2 warmup steps):

    ```python
    import torch
    from torch import nn
    from transformers import get_linear_schedule_with_warmup

    from hf_gr import GradientRegularizer, GRArguments

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=10)
    args = GRArguments(gr_lambda=0.05, gr_r=0.1, gr_warmup_strategy="zero")  # W = 2, read from the scheduler
    regularizer = GradientRegularizer(model, args=args, gradient_accumulation_steps=2, lr_scheduler=scheduler)
    x, y = torch.randn(40, 8), torch.randn(40, 1)
    for i in range(20):  # 20 micro-batches of 2 examples: 10 optimizer steps
        xb, yb = x[2 * i : 2 * i + 2], y[2 * i : 2 * i + 2]
        regularizer.backward(lambda: nn.functional.mse_loss(model(xb), yb) / 2)  # the loss over 2 micro-batches
        if (i + 1) % 2 == 0:  # the step ends where the regularizer counts it: every 2nd micro-batch
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    print(regularizer.completed_steps, regularizer.warmup_step)  # 10 10
    ```

    Under DDP (`DistributedDataParallel`) run the micro-batches that do not end a step under `model.no_sync()` as
    usual; under FSDP2 (`fully_shard`) call `model.set_requires_gradient_sync(False)` before them and `(True)`
    before the last. GR's own first pass handles its synchronization itself.

    With Accelerate, `accelerator.accumulate` decides:

    ```python
    regularizer = GradientRegularizer(model, accelerator, GRArguments(gr_lambda=0.1, gr_r=0.1), lr_scheduler=scheduler)
    for batch in dataloader:
        with accelerator.accumulate(model):
            loss = regularizer.backward(lambda: model(**batch).loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    ```

    Args:
        model (`nn.Module`): the model as the loop calls it (the DDP- or FSDP2-wrapped one).
        accelerator (`accelerate.Accelerator`, *optional*): the loop's accelerator (its `no_sync`, `backward`,
            `sync_gradients`); None for a plain PyTorch loop.
        args (`GRArguments`, *optional*): the GR settings (default: `GRArguments()`).
        seed (`int`, *optional*): the seed of the `gr_probability` draws (default: `args.seed`, else 0).
        warmup_steps (`int`, *optional*): W in optimizer steps (default: `args.gr_warmup_steps`, else read from
            `lr_scheduler`).
        gradient_accumulation_steps (`int`, *optional*): micro-batches per optimizer step in a loop without an
            accelerator (default: 1, unless `backward` is told per call). With an accelerator, its own setting.
        lr_scheduler (`torch.optim.lr_scheduler.LRScheduler`, *optional*): the loop's LR scheduler (or the one
            `accelerator.prepare` returned): the warmup's t is its step count.
        total_steps (`int`, *optional*): the run's optimizer steps T; needed with `gr_probability_end`, whose ramp
            ends at step T − 1.
        optimizer (`torch.optim.Optimizer`, *optional*): the loop's optimizer (or the one `accelerator.prepare`
            returned); needed with `gr_ascent_direction="previous_step"`, whose D is read by a hook on its `step`.

    `gr_ascent_fraction` < 1 (sub-batch ascent) needs pass 1 on part of the batch, which `loss_fn` cannot be
    asked for: the constructor refuses it; `GRTrainer` (any `GRMixin` trainer) slices the inputs itself.

    Attributes:
        planner: plans each optimizer step (internal: its interface may change).
        passes: runs each micro-batch's passes and holds LookSAM's kept direction, `passes.reuse` (internal: its
            interface may change).
        metrics (`Callable[[str, torch.Tensor], None]`, *optional*): when set, receives ‖g1‖ (`gr_grad_norm`), ‖g2‖
            (`gr_perturbed_grad_norm`) and cos(g1, g2) (`gr_cosine`) of each GR micro-batch, as device tensors.
    """

    def __init__(
        self,
        model: nn.Module,
        accelerator: Any = None,
        args: GRArguments | None = None,
        *,
        seed: int | None = None,
        warmup_steps: int | None = None,
        gradient_accumulation_steps: int | None = None,
        lr_scheduler: Any = None,
        total_steps: int | None = None,
        optimizer: Any = None,
    ) -> None:
        args = args if args is not None else GRArguments()
        _check_options(model, accelerator, args, seed, warmup_steps, gradient_accumulation_steps, total_steps)
        if args.gr_ascent_direction == "previous_step" and optimizer is None:
            raise ValueError(
                "gr_ascent_direction='previous_step' steps along the gradient the optimizer applied last: pass "
                "optimizer= (the loop's optimizer, or the one accelerator.prepare returned) so that it can be read "
                "at each optimizer step."
            )
        self._scheduler, self._per_step = _unwrap_scheduler(lr_scheduler, accelerator)  # refuses one it cannot count
        self._warmup_steps = _warmup_length(args, warmup_steps, self._scheduler, self._per_step)
        self._total_steps = total_steps
        self._accelerator = accelerator
        self._accumulation = gradient_accumulation_steps or 1
        self.planner = schedule.StepPlanner(args, int(seed if seed is not None else getattr(args, "seed", 0) or 0))
        self.passes = GRPasses(model, accelerator, args)
        self.passes.begin_training(optimizer, self.passes.trainable())
        self.metrics: Callable[[str, torch.Tensor], None] | None = None
        self._completed_steps = 0  # optimizer steps taken through `backward`
        self._warmup_count = 0  # of which the LR schedule took (those the fp16 scaler did not skip)
        self._micro_batches = 0  # micro-batches of the current step so far
        self._step_plan: StepPlan | None = None  # the plan of the current step, made at its first micro-batch
        self._step_ended = False

    @property
    def completed_steps(self) -> int:
        """The optimizer steps completed through `backward` (counted at each step's last micro-batch)."""
        return self._completed_steps

    @property
    def warmup_step(self) -> int:
        """The warmup's t for the next step: the LR scheduler's step count when `lr_scheduler` was given, else the
        completed optimizer steps less those the accelerator's fp16 scaler skipped (read it after `optimizer.step()`).
        """
        if self._scheduler is not None:
            return schedule.scheduler_step(self._scheduler, 0) // self._per_step
        return self._warmup_count + int(self._step_ended and not self._step_was_skipped())

    def _current_plan(self) -> StepPlan:
        """The plan of the step the next micro-batch belongs to, made at its first micro-batch."""
        self._count_finished_step()
        if self._step_plan is None:
            self._step_plan = self.planner.plan(self._completed_steps, self.warmup_step, self._warmup_steps or 0,
                                                self._total_steps)  # fmt: skip
        return self._step_plan

    def backward(self, loss_fn: Callable[[], torch.Tensor], *, sync_gradients: bool | None = None) -> torch.Tensor:
        """Use in place of `loss.backward()` / `accelerator.backward(loss)`: adds the micro-batch's GR gradient to
        `.grad` and returns the loss (of the first pass).

        Args:
            loss_fn (`Callable[[], torch.Tensor]`): runs the forward pass and returns the loss; called twice on a
                GR step (with the same random masks).
            sync_gradients (`bool`, *optional*): without an accelerator, whether this micro-batch ends the
                optimizer step (default: every `gradient_accumulation_steps`-th call does). With an accelerator,
                its `sync_gradients` decides (a value given must agree).
        """
        last = self._ends_step(sync_gradients)
        plan = self._current_plan()
        exact = plan.kind == GR and self.planner.args.gr_method == "exact"

        def run_pass() -> torch.Tensor:
            loss = loss_fn()
            if exact:
                loss = gradient.exact_gr_loss(loss, self.passes.trainable(), plan.gr_lambda)
            if self._accelerator is not None:
                self._accelerator.backward(loss)
            else:
                loss.backward()
            return loss.detach()

        loss = run_pass() if exact else self.passes.run(run_pass, plan, last, record=self.metrics)
        self._micro_batches += 1
        if last:
            self._completed_steps += 1
            self._micro_batches = 0
            self._step_ended = True
        return loss

    def _ends_step(self, sync_gradients: bool | None) -> bool:
        """Whether the micro-batch about to run ends an optimizer step."""
        if sync_gradients is not None and not isinstance(sync_gradients, bool):
            raise TypeError(f"sync_gradients must be True, False or None, got {sync_gradients!r}.")
        if self._accelerator is not None:
            own = bool(getattr(self._accelerator, "sync_gradients", True))
            if sync_gradients is not None and sync_gradients != own:
                raise ValueError(
                    f"sync_gradients={sync_gradients} contradicts accelerator.sync_gradients={own}: with an "
                    "accelerator, `accelerator.accumulate` decides which micro-batch ends a step; leave it unset."
                )
            return own
        if sync_gradients is not None:
            return sync_gradients
        return self._micro_batches + 1 >= self._accumulation

    def _step_was_skipped(self) -> bool:
        return bool(getattr(self._accelerator, "optimizer_step_was_skipped", False))

    def _count_finished_step(self) -> None:
        """Once the optimizer has stepped: count the step on the LR schedule too, unless the fp16 scaler skipped it."""
        if self._step_ended:
            self._step_ended = False
            self.passes.end_step()
            if not self._step_was_skipped():
                self._warmup_count += 1
            self._step_plan = None
            self.passes.start_step()

    def state_dict(self) -> dict[str, Any]:
        """The step counters and the kept reuse direction (for `accelerator.register_for_checkpointing`)."""
        self._count_finished_step()
        return {"completed_steps": self._completed_steps, "warmup_step": self._warmup_count,
                **self.passes.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self._completed_steps = int(state.get("completed_steps", 0))
        self._warmup_count = int(state.get("warmup_step", self._completed_steps))
        self._micro_batches = 0
        self._step_plan = None
        self._step_ended = False
        self.passes.load_state_dict(state)


def _warmup_length(args: GRArguments, warmup_steps: int | None, scheduler: Any, per_step: int) -> int | None:
    """W in optimizer steps: `warmup_steps`, else `args.gr_warmup_steps`, else read from the LR scheduler."""
    if warmup_steps is None:
        warmup_steps = args.gr_warmup_steps
    if warmup_steps is not None:
        return warmup_steps
    if scheduler is None:
        if args.gr_warmup_strategy != "none":
            raise ValueError(
                f"gr_warmup_strategy={args.gr_warmup_strategy!r} needs the warmup length: set gr_warmup_steps (or "
                "pass warmup_steps= or lr_scheduler=) to your LR warmup in optimizer steps, or use "
                "gr_warmup_strategy='none'."
            )
        return None
    found = schedule.scheduler_warmup_steps(scheduler)
    if found is None and args.gr_warmup_strategy != "none":
        raise ValueError(
            f"gr_warmup_strategy={args.gr_warmup_strategy!r} needs the warmup length, which cannot be read "
            f"from {type(scheduler).__name__}: set gr_warmup_steps (or warmup_steps=) to the LR "
            "warmup in optimizer steps."
        )
    return None if found is None else math.ceil(found / per_step)


def _unwrap_scheduler(lr_scheduler: Any, accelerator: Any) -> tuple[Any, int]:
    """The torch scheduler behind `lr_scheduler` and how many of its steps make one optimizer step.

    `accelerator.prepare` wraps a scheduler so that it steps once per process at each optimizer step (unless the
    batches are split), and not at all on a step the fp16 scaler skipped.
    """
    if lr_scheduler is None:
        return None, 1
    per_step = 1
    inner = getattr(lr_scheduler, "scheduler", None)
    if inner is not None and hasattr(lr_scheduler, "step_with_optimizer"):  # accelerate's AcceleratedScheduler
        if lr_scheduler.step_with_optimizer and not lr_scheduler.split_batches:
            per_step = int(getattr(accelerator, "num_processes", 1) or 1)
        lr_scheduler = inner
    if not isinstance(lr_scheduler, torch_schedulers.LRScheduler) or isinstance(
        lr_scheduler, torch_schedulers.ReduceLROnPlateau
    ):
        raise TypeError(
            "lr_scheduler must be a torch.optim.lr_scheduler.LRScheduler that steps once per optimizer step (or "
            f"the one accelerator.prepare returned), got {type(lr_scheduler).__name__}; without one, leave it unset."
        )
    return lr_scheduler, per_step


def _check_options(model: Any, accelerator: Any, args: Any, seed: Any, warmup_steps: Any,
                   gradient_accumulation_steps: Any, total_steps: Any) -> None:  # fmt: skip
    """Refuse bad or contradictory constructor arguments, and settings `backward` cannot run, naming them."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (the one the loop calls), got {type(model).__name__}.")
    if not isinstance(args, GRArguments):
        raise TypeError(f"args must be a GRArguments (or a subclass), got {type(args).__name__}.")
    integers = (("seed", seed, None), ("warmup_steps", warmup_steps, 0), ("total_steps", total_steps, 1),
                ("gradient_accumulation_steps", gradient_accumulation_steps, 1))  # fmt: skip
    for name, value, least in integers:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or
                                  (least is not None and value < least)):  # fmt: skip
            bound = "an integer" if least is None else f"an integer >= {least}"
            raise ValueError(f"{name} must be {bound} or None, got {value!r}.")
    if warmup_steps is not None and args.gr_warmup_steps is not None and warmup_steps != args.gr_warmup_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} contradicts args.gr_warmup_steps={args.gr_warmup_steps}: set only one."
        )
    if gradient_accumulation_steps is not None and accelerator is not None:
        own = int(getattr(accelerator, "gradient_accumulation_steps", 1))
        if gradient_accumulation_steps != own:
            raise ValueError(
                f"gradient_accumulation_steps={gradient_accumulation_steps} contradicts the accelerator's "
                f"gradient_accumulation_steps={own}: with an accelerator, its `accumulate` decides which "
                "micro-batch ends a step; leave gradient_accumulation_steps unset."
            )
    if args.gr_ascent_fraction < 1:
        raise ValueError(
            f"gr_ascent_fraction={args.gr_ascent_fraction} < 1 runs pass 1 on part of the micro-batch, but "
            "backward(loss_fn) cannot slice the batch inside loss_fn: use gr_ascent_fraction=1 here, or "
            "GRTrainer (a GRMixin trainer), which slices the inputs."
        )
    if args.gr_probability_end is not None and total_steps is None:
        raise ValueError(
            "gr_probability_end ramps p up to the last step of training: pass total_steps= (the run's "
            "optimizer steps) to GradientRegularizer."
        )

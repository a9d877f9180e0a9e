"""`GradientRegularizer`: the GR gradient of one micro-batch, added to `.grad`, for any training loop.

It runs the two passes of a GR step around a function that does one forward and backward (the Trainer's own
`training_step`, or a custom loop's loss and `accelerator.backward` / `loss.backward`):

1. pass 1 under `no_sync` (DDP) or with the reduce-scatter on (FSDP2): g1 = ∇L(θ), with what earlier
   micro-batches accumulated in `.grad` (A) put aside, untouched;
2. d = g1/‖g1‖ (global L2 norm over the trainable parameters, on the device), θ ← θ + r·d;
3. pass 2 at θ + ε with the same random masks. As each parameter's g2 arrives, a gradient hook forms
   g1 + α·(g2 − g1) + A in g1's storage and hands it to autograd, so under DDP the last micro-batch's all-reduce
   carries the combined gradient (one all-reduce per optimizer step, as in plain training). Under FSDP2 (hooks
   on sharded parameters do not fire) the combination is formed on the shards after pass 2. A gradient missing
   from one pass (a parameter that data-dependent routing or an early exit leaves out of that pass's graph)
   counts as 0: α·g2 + A for a parameter only in pass 2, (1 − α)·g1 + A for one only in pass 1;
4. θ restored bit for bit from a copy. When a pass raises, θ and `.grad` (= A) are left exactly as before.

Nothing here reads a value back to the host: a zero or non-finite ‖g1‖ is handled on the device (a zero g1, or one
below the norm floor of its dtype, gives a plain step, counted on the device and logged by `GRTrainer` as
`gr_degenerate_fraction`; a non-finite one gives a non-finite gradient that the fp16 scaler skips).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler as torch_schedulers

from . import gradient, replay, schedule, sync
from .arguments import GRArguments
from .reuse import ReuseState
from .schedule import GR, REUSE, StepPlan


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

    `gr_ascent_fraction` < 1 (sub-batch ascent) needs pass 1 on part of the batch, which `loss_fn` cannot be
    asked for: `backward` refuses it; `GRTrainer` (any `GRMixin` trainer) slices the inputs itself.

    The attributes `model`, `accelerator`, `args`, `reuse`, `metrics` and `diagnostics_scale` are internal (`GRMixin`
    sets some of them per step); a loop needs only the methods and properties above.
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
    ) -> None:
        args = args if args is not None else GRArguments()
        _check_options(model, accelerator, args, seed, warmup_steps, gradient_accumulation_steps)
        if total_steps is not None and (not isinstance(total_steps, int) or isinstance(total_steps, bool) or
                                        total_steps < 1):  # fmt: skip
            raise ValueError(f"total_steps must be an integer >= 1 or None, got {total_steps!r}.")
        self.model = model
        self.accelerator = accelerator
        self.args = args
        self._seed = int(seed if seed is not None else getattr(args, "seed", 0) or 0)
        self._accumulation = gradient_accumulation_steps or 1
        self._scheduler, self._per_step = _unwrap_scheduler(lr_scheduler, accelerator)
        if warmup_steps is None:
            warmup_steps = args.gr_warmup_steps
        if warmup_steps is None and self._scheduler is not None:
            found = schedule.scheduler_warmup_steps(self._scheduler)
            if found is None and args.gr_warmup_strategy != "none":
                raise ValueError(
                    f"gr_warmup_strategy={args.gr_warmup_strategy!r} needs the warmup length, which cannot be read "
                    f"from {type(self._scheduler).__name__}: set gr_warmup_steps (or warmup_steps=) to the LR "
                    "warmup in optimizer steps."
                )
            warmup_steps = None if found is None else math.ceil(found / self._per_step)
        self._warmup_steps = warmup_steps
        # gr_probability_end's ramp: (t0, the first eligible step; T, the run's optimizer steps); GRMixin sets its own
        self._ramp: tuple[int, int] | None = None
        if total_steps is not None:
            strategy, gr_lambda, gr_r = args.gr_warmup_strategy, args.gr_lambda, args.gr_r
            first = schedule.first_eligible_step(
                lambda f: schedule.warmup_coefficients(strategy, gr_lambda, gr_r, f), warmup_steps or 0
            )
            self._ramp = (first, total_steps)
        self._completed_steps = 0  # optimizer steps taken through `backward`
        self._warmup_count = 0  # of which the LR schedule took (those the fp16 scaler did not skip)
        self._micro_batches = 0  # micro-batches of the current step so far
        self._step_plan: StepPlan | None = None  # the plan of the current step, made at its first micro-batch
        self._step_ended = False
        self.reuse = ReuseState()
        self.metrics: Callable[[str, torch.Tensor], None] | None = None  # set while a diagnostic step records
        self.diagnostics_scale = 1.0  # divides raw norms into one batch's (loss scale over accumulation)
        self._degenerate: torch.Tensor | None = None  # GR micro-batches without a direction (on the device)
        self._gr_micro_batches = 0

    # ---- custom loops ----

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
        if self.args.gr_ascent_fraction < 1:
            raise ValueError(
                f"gr_ascent_fraction={self.args.gr_ascent_fraction} < 1 runs pass 1 on part of the micro-batch, but "
                "backward(loss_fn) cannot slice the batch inside loss_fn: use gr_ascent_fraction=1 here, or "
                "GRTrainer (a GRMixin trainer), which slices the inputs."
            )
        last = self._ends_step(sync_gradients)
        plan = self._current_plan()

        def run_pass() -> torch.Tensor:
            loss = loss_fn()
            if plan.kind == GR and self.args.gr_method == "exact":
                loss = gradient.exact_gr_loss(loss, self._trainable(), plan.gr_lambda)
            if self.accelerator is not None:
                self.accelerator.backward(loss)
            else:
                loss.backward()
            return loss.detach()

        if plan.kind == GR and self.args.gr_method == "exact":
            loss = run_pass()
        else:
            loss = self._micro_batch(run_pass, plan, last)
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
        if self.accelerator is not None:
            own = bool(getattr(self.accelerator, "sync_gradients", True))
            if sync_gradients is not None and sync_gradients != own:
                raise ValueError(
                    f"sync_gradients={sync_gradients} contradicts accelerator.sync_gradients={own}: with an "
                    "accelerator, `accelerator.accumulate` decides which micro-batch ends a step; leave it unset."
                )
            return own
        if sync_gradients is not None:
            return sync_gradients
        return self._micro_batches + 1 >= self._accumulation

    def _current_plan(self) -> StepPlan:
        """The plan of the current optimizer step, made at its first micro-batch (once the last step is counted)."""
        self._count_finished_step()
        if self._step_plan is None:
            self._step_plan = self._plan(self._completed_steps, self.warmup_step)
        return self._step_plan

    def _plan(self, step: int, warmup_step: int | None = None) -> StepPlan:
        """The plan of optimizer step `step`, with the warmup at LR-schedule step `warmup_step` (default `step`)."""
        if self.args.gr_warmup_strategy != "none" and self._warmup_steps is None:
            raise ValueError(
                f"gr_warmup_strategy={self.args.gr_warmup_strategy!r} needs the warmup length: set "
                "gr_warmup_steps (or pass warmup_steps= or lr_scheduler=) to your LR warmup in optimizer steps."
            )
        fraction = schedule.warmup_fraction(step if warmup_step is None else warmup_step, self._warmup_steps or 0)
        gr_lambda, gr_r = schedule.warmup_coefficients(
            self.args.gr_warmup_strategy, self.args.gr_lambda, self.args.gr_r, fraction
        )
        return self._plan_from(gr_lambda, gr_r, step)

    def _plan_from(self, gr_lambda: float, gr_r: float, step: int) -> StepPlan:
        """The plan of step `step` given the warmed-up λ_t and r_t (interval, probability and its ramp, reuse)."""
        a = self.args
        probability = a.gr_probability
        if getattr(a, "gr_probability_end", None) is not None:
            if self._ramp is None:
                raise ValueError(
                    "gr_probability_end ramps p up to the last step of training: pass total_steps= (the run's "
                    "optimizer steps) to GradientRegularizer."
                )
            probability = schedule.ramped_probability(a.gr_probability, a.gr_probability_end, step, *self._ramp)
        return schedule.plan_step(
            gr_lambda, gr_r, step, interval=a.gr_interval, probability=probability, reuse=a.gr_reuse,
            seed=self._seed,
        )  # fmt: skip

    def _step_was_skipped(self) -> bool:
        return bool(getattr(self.accelerator, "optimizer_step_was_skipped", False))

    def _count_finished_step(self) -> None:
        """Once the optimizer has stepped: count the step on the LR schedule too, unless the fp16 scaler skipped it."""
        if self._step_ended:
            self._step_ended = False
            if not self._step_was_skipped():
                self._warmup_count += 1
            self._step_plan = None
            self._start_step()

    def state_dict(self) -> dict[str, Any]:
        """The step counters and the kept reuse direction (for `accelerator.register_for_checkpointing`)."""
        self._count_finished_step()
        return {"completed_steps": self._completed_steps, "warmup_step": self._warmup_count,
                **self.reuse.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self._completed_steps = int(state.get("completed_steps", 0))
        self._warmup_count = int(state.get("warmup_step", self._completed_steps))
        self._micro_batches = 0
        self._step_plan = None
        self._step_ended = False
        self.reuse.load_state_dict(state)

    # ---- one micro-batch (what GRMixin drives) ----

    def _start_step(self) -> None:
        """Mark the start of an optimizer step (its first micro-batch comes next)."""
        self.reuse.collecting = False

    def _trainable(self) -> list[torch.Tensor]:
        """The parameters that require a gradient, in `model.parameters()` order."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def _micro_batch(
        self,
        run_pass: Callable[[], torch.Tensor],
        plan: StepPlan,
        last_micro_batch: bool,
        ascent_pass: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One micro-batch of an optimizer step planned as `plan`; `run_pass` does one forward and backward.

        `ascent_pass`, when given, runs a GR step's pass 1 instead of `run_pass`: the forward and backward of a
        sub-batch (`gr_ascent_fraction`), whose g1 gives only the direction of ε (see `hf_gr.ascent`).
        """
        if plan.kind != GR:
            loss = run_pass()
            if plan.kind == REUSE and last_micro_batch:
                trainable = self._trainable()
                self.reuse.apply_(trainable, self._sum_over_ranks if sync.is_sharded(trainable) else None)
            return loss
        return self._gr_micro_batch(run_pass, plan, last_micro_batch, ascent_pass)

    def _gr_micro_batch(
        self,
        run_pass: Callable[[], torch.Tensor],
        plan: StepPlan,
        last: bool,
        ascent_pass: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The two passes; returns pass 1's loss (the sub-batch's, with `ascent_pass`)."""
        trainable = self._trainable()
        sharded = sync.is_sharded(trainable)
        accumulated = gradient.take_grads(trainable)  # A, put aside untouched (restored as is on a raise)
        rng = replay.rng_state()
        try:
            with sync.gradient_sync(self.model, self.accelerator, sharded, on=sharded):
                loss = (ascent_pass or run_pass)()  # sub-batch ascent: only the direction of g1 is used
        except BaseException:
            gradient.put_back_(trainable, accumulated)
            raise
        world = sync.world_size(self.accelerator)
        if self.args.gr_sync_perturbation and world > 1 and not sharded:
            sync.average_across_replicas_(trainable, world)
        params, g1 = gradient.params_with_grads(trainable)
        local_params, local_g1 = sync.local_shards(params), sync.local_shards(g1)
        if self.args.gr_reuse:
            self.reuse.collect_(trainable, params, local_g1)
        squared = gradient.squared_norm(local_g1)
        if sharded:
            squared = self._sum_over_ranks(squared)
        norm = squared.sqrt()
        divisor, valid = gradient.safe_divisor(norm, gradient.norm_floor(local_g1))
        self._count_degenerate(norm, valid)
        a_of = dict(zip(map(id, trainable), accumulated)) if accumulated is not None else {}
        backup = gradient.snapshot(local_params)
        handles: list[Any] = []
        measured: list[torch.Tensor] = []
        try:
            gradient.perturb_(local_params, local_g1, plan.gr_r, divisor)
            if self.args.gr_first_term == "normalized":
                gradient.scale_(local_g1, divisor, divide=True)  # the official code mixes (1 − α)·g1/‖g1‖
            if self.metrics is not None:
                self.metrics("gr_grad_norm", norm / self.diagnostics_scale)
            with_g1 = {id(p) for p in params}
            for p in trainable:  # without a g1, A stays in `.grad` (DDP may read it), unless FSDP2 adds g2 to it
                p.grad = None if id(p) in with_g1 or sharded else a_of.get(id(p))
            replay.set_rng_state(rng)
            if sharded:
                self._second_pass_sharded(run_pass, trainable, params, g1, local_g1, a_of, plan.alpha, measured)
            else:
                local_g1.clear()  # the same tensors as g1, which the combination now owns
                combination = _Combination(
                    trainable,
                    params,
                    g1,
                    a_of,
                    plan.alpha,
                    keep_g1=plan.alpha != 1.0 or self.metrics is not None,
                    measure=measured if self.metrics else None,
                )
                handles = combination.install()
                if sync.finds_unused_parameters(self.model):  # DDP reads unused parameters' `.grad` as backward starts
                    handles.append(self.model.register_forward_hook(combination.finish_unreached))
                with replay.frozen_running_stats(self.model):
                    run_pass()
                unfired = combination.finish_unfired()
                if unfired and sync.reduces_only_used_parameters(self.model):
                    raise RuntimeError(
                        f"GR's perturbation changed which parameters the model uses: {unfired} parameter(s) had a "
                        "gradient at θ but none at θ + ε (data-dependent routing or an early exit), which DDP "
                        "without find_unused_parameters cannot all-reduce. Set ddp_find_unused_parameters=True "
                        "(TrainingArguments) or find_unused_parameters=True (DistributedDataParallel, or accelerate's "
                        "DistributedDataParallelKwargs)."
                    )
        except BaseException:
            gradient.put_back_(trainable, accumulated)
            raise
        finally:
            for handle in handles:
                handle.remove()
            gradient.restore_(local_params, backup)
        if measured and self.metrics is not None:
            self._record_second_pass(norm, measured)
        if self.args.gr_reuse and last:
            per_replica = world > 1 and not sharded and not self.args.gr_sync_perturbation
            mean = (lambda t: self._sum_over_ranks(t) / world) if per_replica else None  # the replica-mean g1
            self.reuse.finish_(trainable, mean, self._sum_over_ranks if sharded else None)
        return loss

    # ---- the combination ----

    def _second_pass_sharded(
        self,
        run_pass: Callable[[], torch.Tensor],
        trainable: list[torch.Tensor],
        params: list[torch.Tensor],
        g1: list[torch.Tensor],
        local_g1: list[torch.Tensor],
        a_of: dict[int, torch.Tensor | None],
        alpha: float,
        measured: list[torch.Tensor],
    ) -> None:
        """FSDP2: pass 2 reduce-scatters g2 into `.grad` (None before it); then, on each rank's shards,
        g1 + α·(g2 − g1) + A in g1's storage, a missing g2 or g1 counting as 0 (α·g2 + A for a parameter only in
        pass 2's graph; A alone for one in neither)."""
        with sync.gradient_sync(self.model, self.accelerator, True, on=True), replay.frozen_running_stats(self.model):
            run_pass()
        first_of = {id(p): (first, first_local) for p, first, first_local in zip(params, g1, local_g1)}
        for p in trainable:
            a = a_of.get(id(p))
            a_local = None if a is None else sync.local_shards([a])[0]
            if id(p) not in first_of:
                if p.grad is None:
                    p.grad = a
                    continue
                g2 = sync.local_shards([p.grad])[0]  # only in pass 2's graph: α·g2 (+ A), in g2's storage
                if self.metrics is not None:
                    measured.append(_measure(g2, None))
                with torch.no_grad():
                    g2.mul_(alpha)
                    if a_local is not None:
                        g2.add_(a_local)
                continue
            first, first_local = first_of[id(p)]
            g2 = sync.local_shards([p.grad])[0] if p.grad is not None else torch.zeros_like(first_local)
            if self.metrics is not None:
                measured.append(_measure(g2, first_local))
            gradient.mix_(first_local, g2, alpha, a_local)
            p.grad = first
        if measured:  # summed over ranks on the parameters' device (an NCCL group reduces nothing on the CPU)
            measured[:] = [self._sum_over_ranks(torch.stack(measured).sum(0))]

    def _record_second_pass(self, norm: torch.Tensor, measured: list[torch.Tensor]) -> None:
        """Record ‖g2‖ and cos(g1, g2) from the per-parameter (‖g2‖², ⟨g2, g1⟩) sums, on the device."""
        total = torch.stack([m.to(norm.device) for m in measured]).sum(0)
        first_norm = norm.to(total.dtype)
        g2_norm = total[0].sqrt()
        dot = total[1] if self.args.gr_first_term == "raw" else total[1] * first_norm
        product = g2_norm * first_norm
        cosine = torch.where(product > 0, dot / torch.where(product > 0, product, 1.0), torch.zeros_like(product))
        self.metrics("gr_perturbed_grad_norm", g2_norm / self.diagnostics_scale)
        self.metrics("gr_cosine", cosine)

    def _count_degenerate(self, norm: torch.Tensor, valid: torch.Tensor) -> None:
        """Count, on the device, a GR micro-batch whose finite ‖g1‖ gave no direction (it ran as a plain step)."""
        degenerate = (torch.isfinite(norm) & ~valid).to(torch.float32)
        self._degenerate = degenerate if self._degenerate is None else self._degenerate + degenerate
        self._gr_micro_batches += 1

    def _pop_degenerate_fraction(self) -> torch.Tensor | None:
        """The share of GR micro-batches since the last call whose ‖g1‖ was zero or below the norm floor of the
        gradients' dtype, so that GR had no direction and the micro-batch ran as a plain step (for example fp16
        gradients without a loss scaler, which underflow). A device tensor (read it where values are read anyway,
        at logging); None when no GR micro-batch ran."""
        if self._degenerate is None:
            return None
        fraction = self._degenerate / self._gr_micro_batches
        self._degenerate, self._gr_micro_batches = None, 0
        return fraction

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        return sync.all_reduce_sum(tensor, sync.world_size(self.accelerator))


def _measure(g2: torch.Tensor, g1: torch.Tensor | None) -> torch.Tensor:
    """(‖g2‖², ⟨g2, g1⟩) of one parameter in float32 or wider, on g2's device (⟨g2, g1⟩ = 0 without a g1)."""
    g2 = g2.detach().to(torch.promote_types(g2.dtype, torch.float32))
    dot = (g2 * g1.to(g2.dtype)).sum() if g1 is not None else torch.zeros((), dtype=g2.dtype, device=g2.device)
    return torch.stack([g2.square().sum(), dot])


class _Combination:
    """Gradient hooks that turn each parameter's arriving g2 into g1 + α·(g2 − g1) + A, in g1's storage.

    A hook runs before autograd accumulates into `.grad` and before DDP reads it, so the one all-reduce of the
    last micro-batch carries the combined gradient. At α = 1 without diagnostics g1 is not kept (g = g2 + A).
    A gradient missing from one pass counts as 0: a parameter only in pass 2's graph gets α·g2 + A, one only in
    pass 1's (1 − α)·g1 + A, set before pass 2's backward under DDP with `find_unused_parameters` (which reads
    the `.grad` of the parameters it finds unused as backward starts), else after pass 2.
    """

    def __init__(self, trainable: list[torch.Tensor], params: list[torch.Tensor], g1: list[torch.Tensor],
                 a_of: dict[int, torch.Tensor | None], alpha: float, keep_g1: bool,
                 measure: list[torch.Tensor] | None) -> None:  # fmt: skip
        self.params, self.alpha, self.measure = trainable, alpha, measure
        first_of = dict(zip(map(id, params), g1))
        self.has_g1 = [id(p) in first_of for p in trainable]
        self.g1: list[torch.Tensor | None] = [first_of.get(id(p)) if keep_g1 else None for p in trainable]
        g1.clear()  # the caller's list must not keep g1 alive: autograd may then take a result as `.grad` itself
        first_of.clear()
        self.accumulated = [a_of.get(id(p)) for p in trainable]
        self.done = [False] * len(trainable)

    def install(self) -> list[Any]:
        return [p.register_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _hook(self, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def combine(g2: torch.Tensor) -> torch.Tensor:
            if self.done[i]:  # a later part of g2 (reentrant checkpointing accumulates per segment): α·part
                return g2 if self.alpha == 1.0 else g2 * self.alpha
            self.done[i] = True
            g1, self.g1[i] = self.g1[i], None
            accumulated = self.accumulated[i]
            if self.measure is not None:
                self.measure.append(_measure(g2, g1))
            if not self.has_g1[i]:  # only in pass 2's graph: α·g2 + A, a new tensor (A, in `.grad`, stays intact)
                self.params[i].grad = None
                part = g2 if self.alpha == 1.0 else g2 * self.alpha
                return part if accumulated is None else part + accumulated
            if g1 is None:  # α = 1: g = g2 (+ A)
                return g2 if accumulated is None else g2 + accumulated
            return gradient.mix_(g1, g2, self.alpha, accumulated)

        return combine

    def _without_g2(self, i: int) -> torch.Tensor:
        """(1 − α)·g1 + A for a parameter with a g1 and no g2 (zeros at α = 1 without A: a gradient, not None)."""
        self.done[i] = True
        g1, self.g1[i] = self.g1[i], None
        accumulated = self.accumulated[i]
        if g1 is None:
            return accumulated if accumulated is not None else torch.zeros_like(self.params[i])
        return gradient.mix_(g1, torch.zeros_like(g1), self.alpha, accumulated)

    def finish_unreached(self, module: nn.Module, args: Any, outputs: Any) -> None:
        """A forward hook for pass 2 under DDP: the parameters with a g1 that pass 2's graph does not reach get
        (1 − α)·g1 + A now, before the backward in which DDP all-reduces their `.grad` as unused parameters."""
        reached = sync.reached_parameters(outputs)
        for i, p in enumerate(self.params):
            if self.has_g1[i] and not self.done[i] and id(p) not in reached:
                p.grad = self._without_g2(i)

    def finish_unfired(self) -> int:
        """After pass 2: a parameter that had a g1 but got no g2 gets (1 − α)·g1 + A; one with neither keeps A.
        Returns how many had a g1 and got no g2 (and were not finished before pass 2's backward)."""
        unfired = 0
        for i, p in enumerate(self.params):
            if self.has_g1[i] and not self.done[i]:
                p.grad = self._without_g2(i)
                unfired += 1
        return unfired


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


def _check_options(
    model: Any, accelerator: Any, args: Any, seed: Any, warmup_steps: Any, gradient_accumulation_steps: Any
) -> None:
    """Refuse bad or contradictory constructor arguments, naming them."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (the one the loop calls), got {type(model).__name__}.")
    if not isinstance(args, GRArguments):
        raise TypeError(f"args must be a GRArguments (or a subclass), got {type(args).__name__}.")
    for name, value, least in (("seed", seed, None), ("warmup_steps", warmup_steps, 0),
                               ("gradient_accumulation_steps", gradient_accumulation_steps, 1)):  # fmt: skip
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

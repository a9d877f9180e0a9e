"""`GradientRegularizer`: the GR gradient of one micro-batch, added to `.grad`, for any training loop.

It runs the two passes of a GR step around a function that does one forward and backward (the Trainer's own
`training_step`, or a custom loop's loss and `accelerator.backward`):

1. pass 1 under `no_sync` (DDP) or with the reduce-scatter on (FSDP2): g1 = ∇L(θ), with what earlier
   micro-batches accumulated in `.grad` (A) put aside, untouched;
2. d = g1/‖g1‖ (global L2 norm over the trainable parameters, on the device), θ ← θ + r·d;
3. pass 2 at θ + ε with the same random masks. As each parameter's g2 arrives, a gradient hook forms
   g1 + α·(g2 − g1) + A in g1's storage and hands it to autograd, so under DDP the last micro-batch's all-reduce
   carries the combined gradient (one all-reduce per optimizer step, as in plain training). Under FSDP2 (hooks
   on sharded parameters do not fire) the combination is formed on the shards after pass 2;
4. θ restored bit for bit from a copy. When a pass raises, θ and `.grad` (= A) are left exactly as before.

Nothing here reads a value back to the host: a zero or non-finite ‖g1‖ is handled on the device (a zero g1 gives
a plain step, a non-finite one a non-finite gradient that the fp16 scaler skips).

For a custom Accelerate loop, call `backward(loss_fn)` in place of `accelerator.backward(loss)`:

    regularizer = GradientRegularizer(model, accelerator, GRArguments(gr_lambda=0.1, gr_r=0.1, gr_warmup_steps=100))
    for batch in dataloader:
        with accelerator.accumulate(model):
            loss = regularizer.backward(lambda: model(**batch).loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import gradient, replay, schedule, sync
from .arguments import GRArguments
from .reuse import ReuseState
from .schedule import GR, REUSE, StepPlan


class GradientRegularizer:
    """Computes the GR gradient of each micro-batch into `.grad`, for the Trainer (`GRMixin`) and custom loops.

    Args:
        model (`nn.Module`): the model as the loop calls it (the DDP/FSDP-wrapped one after `accelerator.prepare`).
        accelerator (`accelerate.Accelerator`, *optional*): the loop's accelerator (its `no_sync`, `backward`,
            `sync_gradients`); None for a plain PyTorch loop.
        args (`GRArguments`, *optional*): the GR settings (default: `GRArguments()`).
        seed (`int`, *optional*): the seed of the `gr_probability` draws (default: `args.seed`, else 0).
        warmup_steps (`int`, *optional*): W for custom loops (default: `args.gr_warmup_steps`).
    """

    def __init__(
        self,
        model: nn.Module,
        accelerator: Any = None,
        args: GRArguments | None = None,
        seed: int | None = None,
        warmup_steps: int | None = None,
    ) -> None:
        self.model = model
        self.accelerator = accelerator
        self.args = args if args is not None else GRArguments()
        self.seed = int(seed if seed is not None else getattr(self.args, "seed", 0) or 0)
        self.warmup_steps = warmup_steps if warmup_steps is not None else self.args.gr_warmup_steps
        self.completed_steps = 0  # optimizer steps taken through `backward` (custom loops)
        self.warmup_step = 0  # of which the LR scheduler took (those the fp16 scaler did not skip)
        self._step_ended = False
        self.reuse = ReuseState()
        self.metrics: Callable[[str, torch.Tensor], None] | None = None  # set while a diagnostic step records
        self.diagnostics_scale = 1.0  # divides raw norms into one batch's (loss scale over accumulation)
        self._degenerate: torch.Tensor | None = None  # GR micro-batches without a direction (on the device)
        self._gr_micro_batches = 0

    # ---- custom loops ----

    def plan(self, step: int, warmup_step: int | None = None) -> StepPlan:
        """The plan of optimizer step `step` for a custom loop (W = `warmup_steps`; the warmup at `warmup_step`,
        the LR schedule's count, which skips the steps the fp16 scaler skipped; default `step`)."""
        if self.args.gr_warmup_strategy != "none" and self.warmup_steps is None:
            raise ValueError(
                f"gr_warmup_strategy={self.args.gr_warmup_strategy!r} needs the warmup length: set "
                "gr_warmup_steps (or pass warmup_steps=) to your LR warmup in optimizer steps."
            )
        fraction = schedule.warmup_fraction(step if warmup_step is None else warmup_step, self.warmup_steps or 0)
        gr_lambda, gr_r = schedule.warmup_coefficients(
            self.args.gr_warmup_strategy, self.args.gr_lambda, self.args.gr_r, fraction
        )
        return self.plan_from(gr_lambda, gr_r, step)

    def plan_from(self, gr_lambda: float, gr_r: float, step: int) -> StepPlan:
        """The plan of step `step` given the warmed-up λ_t and r_t (interval, probability, reuse applied)."""
        a = self.args
        return schedule.plan_step(
            gr_lambda, gr_r, step, interval=a.gr_interval, probability=a.gr_probability, reuse=a.gr_reuse,
            seed=self.seed,
        )  # fmt: skip

    def backward(self, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Use in place of `accelerator.backward(loss_fn())`: adds this micro-batch's GR gradient to `.grad`.

        `loss_fn` runs the forward pass and returns the loss; it is called twice on a GR step. The step counters
        (for the warmup and the cheaper modes) advance after every micro-batch that syncs gradients.
        """
        self._count_finished_step()
        plan = self.plan(self.completed_steps, self.warmup_step)
        last = bool(getattr(self.accelerator, "sync_gradients", True))

        def run_pass() -> torch.Tensor:
            loss = loss_fn()
            if plan.kind == GR and self.args.gr_method == "exact":
                loss = gradient.exact_gr_loss(loss, self.trainable(), plan.gr_lambda)
            if self.accelerator is not None:
                self.accelerator.backward(loss)
            else:
                loss.backward()
            return loss.detach()

        if plan.kind == GR and self.args.gr_method == "exact":
            loss = run_pass()
        else:
            loss = self.step(run_pass, plan, last)
        if last:
            self.completed_steps += 1
            self._step_ended = True
        return loss

    def _count_finished_step(self) -> None:
        """Once the optimizer has stepped: count the step on the LR schedule too, unless the fp16 scaler skipped it."""
        if self._step_ended:
            self._step_ended = False
            if not getattr(self.accelerator, "optimizer_step_was_skipped", False):
                self.warmup_step += 1
            self.start_step()

    def state_dict(self) -> dict[str, Any]:
        """The step counters and the kept reuse direction (for `accelerator.register_for_checkpointing`)."""
        self._count_finished_step()
        return {"completed_steps": self.completed_steps, "warmup_step": self.warmup_step, **self.reuse.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.completed_steps = int(state.get("completed_steps", 0))
        self.warmup_step = int(state.get("warmup_step", self.completed_steps))
        self._step_ended = False
        self.reuse.load_state_dict(state)

    # ---- one micro-batch ----

    def start_step(self) -> None:
        """Mark the start of an optimizer step (its first micro-batch comes next)."""
        self.reuse.collecting = False

    def trainable(self) -> list[torch.Tensor]:
        """The parameters that require a gradient, in `model.parameters()` order."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def step(self, run_pass: Callable[[], torch.Tensor], plan: StepPlan, last_micro_batch: bool) -> torch.Tensor:
        """One micro-batch of an optimizer step planned as `plan`; `run_pass` does one forward and backward."""
        if plan.kind != GR:
            loss = run_pass()
            if plan.kind == REUSE and last_micro_batch:
                trainable = self.trainable()
                self.reuse.apply_(trainable, self._sum_over_ranks if sync.is_sharded(trainable) else None)
            return loss
        return self._gr_micro_batch(run_pass, plan, last_micro_batch)

    def _gr_micro_batch(self, run_pass: Callable[[], torch.Tensor], plan: StepPlan, last: bool) -> torch.Tensor:
        trainable = self.trainable()
        sharded = sync.is_sharded(trainable)
        accumulated = gradient.take_grads(trainable)  # A, put aside untouched (restored as is on a raise)
        rng = replay.rng_state()
        try:
            with sync.gradient_sync(self.model, self.accelerator, sharded, on=sharded):
                loss = run_pass()
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
            for p in trainable:  # A stays in `.grad` only where pass 2 adds nothing to it (DDP reads it there)
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
                combination.finish_unfired()
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

    def pop_degenerate_fraction(self) -> torch.Tensor | None:
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

    def finish_unfired(self) -> None:
        """After pass 2: a parameter that had a g1 but got no g2 gets (1 − α)·g1 + A; one with neither keeps A."""
        for i, p in enumerate(self.params):
            if self.has_g1[i] and not self.done[i]:
                p.grad = self._without_g2(i)

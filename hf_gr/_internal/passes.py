"""The passes phase of a GR step: one micro-batch's forward-backward passes around a function that does one.

`GRPasses.run` takes the step's plan (`schedule`) and a `run_pass` (the Trainer's own `training_step`, or
a custom loop's loss and backward). A plain step runs it once; a reuse step once, then adds the kept LookSAM
correction (`reuse`) on the step's last micro-batch. A GR step:

1. pass 1 under `no_sync` (DDP) or with the reduce-scatter on (FSDP2): g1 = ∇L(θ), with what earlier
   micro-batches accumulated in `.grad` (A) put aside, untouched;
2. d = g1/‖g1‖ (global L2 norm over the trainable parameters, on the device), θ ← θ + r·d;
3. pass 2 at θ + ε with the same random masks and BatchNorm statistics (`replay`), its gradient combined
   into `.grad` as it arrives (`combine`);
4. θ restored bit for bit from a copy. When a pass raises, θ and `.grad` (= A) are left exactly as before.

A one-pass GR step (`gr_ascent_direction="previous_step"`, `previous`) perturbs along D instead and runs its one
forward-backward at θ + ε as a plain step runs at θ: its gradient accumulates into `.grad`, BatchNorm statistics
are updated there, and nothing is measured for the diagnostics. θ is restored bit for bit; when the pass raises,
`.grad` holds what a raising plain step would leave.

Nothing here reads a value back to the host: a zero or non-finite ‖g1‖ is handled on the device (a zero g1, or one
below the norm floor of its dtype, gives a plain step, counted by `pop_degenerate_fraction`; a non-finite one
gives a non-finite gradient that the fp16 scaler skips).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import gradient, replay, sync
from .combine import HookCombination, combine_shards
from .previous import PreviousDirection
from .reuse import ReuseState
from .schedule import GR, REUSE, StepPlan

Record = Callable[[str, torch.Tensor], None]


class GRPasses:
    """Runs the micro-batches of planned steps; the model is left at θ between calls.

    Args:
        model (`nn.Module`): the model as the loop calls it (DDP- or FSDP2-wrapped); `GRMixin` sets it per step,
            since `hyperparameter_search` may swap it.
        accelerator (`accelerate.Accelerator`, *optional*): its `no_sync` and process count, if any.
        args (`GRArguments`): read for `gr_method`, `gr_first_term`, `gr_reuse` and `gr_sync_perturbation`.
    """

    def __init__(self, model: nn.Module, accelerator: Any, args: Any) -> None:
        self.model, self.accelerator, self.args = model, accelerator, args
        self.reuse = ReuseState()  # LookSAM's kept direction (checkpointed)
        self.previous = PreviousDirection()  # D, the last applied gradient (`gr_ascent_direction="previous_step"`)
        self._degenerate: torch.Tensor | None = None  # GR micro-batches without a direction (on the device)
        self._gr_micro_batches = 0

    def start_step(self) -> None:
        """Mark the start of an optimizer step (its first micro-batch comes next)."""
        self.reuse.collecting = False

    def end_step(self) -> None:
        """Mark the end of an optimizer step (after the optimizer's `step`, or its skip)."""
        self.previous.step_ended()

    def begin_training(self, optimizer: Any, trainable: list[torch.Tensor]) -> None:
        """At train start: refuse `trainable` parameters the flat buffers (LookSAM's u, D) cannot hold, and capture
        D at each step of `optimizer` with `previous_step`. The parameters are the caller's: a Trainer with
        `model_init` builds a new model in `train()`, before this object sees it."""
        if self.args.gr_reuse:
            sync.check_one_device(trainable)
        if self.args.gr_ascent_direction == "previous_step":
            self.previous.attach(optimizer, trainable)

    def trainable(self) -> list[torch.Tensor]:
        """The parameters that require a gradient, in `model.parameters()` order."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def run(
        self,
        run_pass: Callable[[], torch.Tensor],
        plan: StepPlan,
        last_micro_batch: bool,
        ascent_pass: Callable[[], torch.Tensor] | None = None,
        record: Record | None = None,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """One micro-batch of a step planned as `plan`; returns the loss of its first pass.

        Args:
            run_pass: one forward and backward of the micro-batch, returning the loss.
            plan: the step's plan.
            last_micro_batch: whether the micro-batch ends the optimizer step.
            ascent_pass: runs a GR step's pass 1 instead of `run_pass` (sub-batch ascent, `ascent`): only the
                direction of its g1 is used.
            record: where a diagnostics step records ‖g1‖, ‖g2‖ and cos(g1, g2) (device tensors).
            scale: divides raw norms into one batch's (the loss scale over the accumulation steps).
        """
        if plan.kind == GR and self.one_pass(plan):
            return self._one_pass(run_pass, plan)
        if plan.kind == GR:
            return self._gr_micro_batch(run_pass, plan, last_micro_batch, ascent_pass, record, scale)
        loss = run_pass()
        if plan.kind == REUSE and last_micro_batch:
            trainable = self.trainable()
            self.reuse.apply_(trainable, self.sum_over_ranks if sync.is_sharded(trainable) else None)
        return loss

    def one_pass(self, plan: StepPlan) -> bool:
        """Whether a GR step planned as `plan` takes one pass along D (`previous_step`, α_t = 1, a D to use)."""
        return self.args.gr_ascent_direction == "previous_step" and plan.alpha == 1.0 and self.previous.ready

    def _one_pass(self, run_pass: Callable[[], torch.Tensor], plan: StepPlan) -> torch.Tensor:
        """θ ← θ + r·D/‖D‖, one forward-backward (its gradient accumulates into `.grad` as a plain step's does),
        θ restored bit for bit."""
        trainable = self.trainable()
        views, divisor = self.previous.direction(trainable, self.sum_over_ranks)
        local_params = sync.local_shards(trainable)
        views = [v if v.dtype == p.dtype else v.to(p.dtype) for v, p in zip(views, local_params)]
        backup = gradient.snapshot(local_params)
        try:
            gradient.perturb_(local_params, views, plan.gr_r, divisor)
            del views  # a half-precision copy of D must not live through the pass
            return run_pass()
        finally:
            gradient.restore_(local_params, backup)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: LookSAM's u and ρ, and D."""
        return {**self.reuse.state_dict(), **self.previous.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.reuse.load_state_dict(state)
        self.previous.load_state_dict(state)

    def _gr_micro_batch(self, run_pass: Callable[[], torch.Tensor], plan: StepPlan, last: bool,
                        ascent_pass: Callable[[], torch.Tensor] | None, record: Record | None,
                        scale: float) -> torch.Tensor:  # fmt: skip
        """Pass 1 and the direction, then the perturbed pass 2 (`_second_pass`)."""
        trainable = self.trainable()
        sharded = sync.is_sharded(trainable)
        accumulated = gradient.take_grads(trainable)  # A, put aside untouched (restored as is on a raise)
        rng = replay.rng_state()
        try:
            with sync.gradient_sync(self.model, self.accelerator, sharded, on=sharded):
                loss = (ascent_pass or run_pass)()
        except BaseException:
            gradient.put_back_(trainable, accumulated)
            raise
        world = sync.world_size(self.accelerator)
        if self.args.gr_sync_perturbation and world > 1 and not sharded:
            sync.average_across_replicas_(trainable, world)
        params, g1 = gradient.params_with_grads(trainable)
        local_g1 = sync.local_shards(g1)
        if self.args.gr_reuse:
            self.reuse.collect_(trainable, params, local_g1)
        squared = gradient.squared_norm(local_g1)
        norm = (self.sum_over_ranks(squared) if sharded else squared).sqrt()
        divisor, valid = gradient.safe_divisor(norm, gradient.norm_floor(local_g1))
        del local_g1  # the combination alone may hold g1 (autograd then forms `.grad` in its storage)
        self._count_degenerate(norm, valid)
        if record is not None:
            record("gr_grad_norm", norm / scale)
        accumulated_of = dict(zip(map(id, trainable), accumulated)) if accumulated is not None else {}
        measured = self._second_pass(run_pass, plan, trainable, params, g1, divisor, accumulated, accumulated_of,
                                     rng, record is not None)  # fmt: skip
        if measured:
            self._record_second_pass(record, norm, measured, scale)
        if self.args.gr_reuse and last:
            per_replica = world > 1 and not sharded and not self.args.gr_sync_perturbation
            mean = (lambda t: self.sum_over_ranks(t) / world) if per_replica else None  # the replica-mean g1
            self.reuse.finish_(trainable, mean, self.sum_over_ranks if sharded else None)
        return loss

    def _second_pass(self, run_pass: Callable[[], torch.Tensor], plan: StepPlan, trainable: list[torch.Tensor],
                     params: list[torch.Tensor], g1: list[torch.Tensor], divisor: torch.Tensor,
                     accumulated: list[torch.Tensor | None] | None,
                     accumulated_of: dict[int, torch.Tensor | None], rng: dict[str, Any],
                     measuring: bool) -> list[torch.Tensor]:  # fmt: skip
        """θ ← θ + r·g1/d, pass 2 with pass 1's random masks, its gradient combined into `.grad`; θ restored bit
        for bit, and `.grad` = A again if anything raises. Returns the diagnostics' (‖g2‖², ⟨g2, g1⟩) sums."""
        sharded = sync.is_sharded(trainable)
        local_params, local_g1 = sync.local_shards(params), sync.local_shards(g1)
        backup = gradient.snapshot(local_params)
        measured: list[torch.Tensor] | None = [] if measuring else None
        handles: list[Any] = []
        try:
            gradient.perturb_(local_params, local_g1, plan.gr_r, divisor)
            if self.args.gr_first_term == "normalized":
                gradient.scale_(local_g1, divisor, divide=True)  # the official code mixes (1 − α)·g1/‖g1‖
            with_g1 = {id(p) for p in params}
            for p in trainable:  # without a g1, A stays in `.grad` (DDP may read it), unless FSDP2 adds g2 to it
                p.grad = None if id(p) in with_g1 or sharded else accumulated_of.get(id(p))
            replay.set_rng_state(rng)
            if sharded:
                with sync.gradient_sync(self.model, self.accelerator, True, on=True):
                    with replay.frozen_running_stats(self.model):
                        run_pass()
                g1_of = {id(p): pair for p, pair in zip(params, zip(g1, local_g1))}
                combine_shards(trainable, g1_of, accumulated_of, plan.alpha, measured)
                if measured:  # summed over ranks on the parameters' device (NCCL reduces nothing on the CPU)
                    measured[:] = [self.sum_over_ranks(torch.stack(measured).sum(0))]
            else:
                keep_g1 = plan.alpha != 1.0 or measuring
                combination = HookCombination(trainable, dict(zip(map(id, params), g1)), accumulated_of,
                                              plan.alpha, keep_g1, measured)  # fmt: skip
                del g1[:], local_g1[:]  # autograd must not see g1 referenced here: it may take a result as `.grad`
                handles = combination.install()
                if sync.finds_unused_parameters(self.model):  # DDP reads unused parameters' `.grad` as backward starts
                    handles.append(self.model.register_forward_hook(combination.finish_unreached))
                with replay.frozen_running_stats(self.model):
                    run_pass()
                self._check_routing(combination.finish_unfired())
        except BaseException:
            gradient.put_back_(trainable, accumulated)
            raise
        finally:
            for handle in handles:
                handle.remove()
            gradient.restore_(local_params, backup)
        return measured or []

    def _check_routing(self, unfired: int) -> None:
        """Refuse a pass 2 that left out parameters pass 1 used when DDP cannot all-reduce a missing gradient."""
        if unfired and sync.reduces_only_used_parameters(self.model):
            raise RuntimeError(
                f"GR's perturbation changed which parameters the model uses: {unfired} parameter(s) had a "
                "gradient at θ but none at θ + ε (data-dependent routing or an early exit), which DDP "
                "without find_unused_parameters cannot all-reduce. Set ddp_find_unused_parameters=True "
                "(TrainingArguments) or find_unused_parameters=True (DistributedDataParallel, or accelerate's "
                "DistributedDataParallelKwargs)."
            )

    def _record_second_pass(self, record: Record, norm: torch.Tensor, measured: list[torch.Tensor],
                            scale: float) -> None:  # fmt: skip
        """Record ‖g2‖ and cos(g1, g2) from the per-parameter (‖g2‖², ⟨g2, g1⟩) sums, on the device."""
        total = torch.stack([m.to(norm.device) for m in measured]).sum(0)
        first_norm = norm.to(total.dtype)
        g2_norm = total[0].sqrt()
        dot = total[1] if self.args.gr_first_term == "raw" else total[1] * first_norm
        product = g2_norm * first_norm
        cosine = torch.where(product > 0, dot / torch.where(product > 0, product, 1.0), torch.zeros_like(product))
        record("gr_perturbed_grad_norm", g2_norm / scale)
        record("gr_cosine", cosine)

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

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the data-parallel processes (itself with one)."""
        return sync.all_reduce_sum(tensor, sync.world_size(self.accelerator))

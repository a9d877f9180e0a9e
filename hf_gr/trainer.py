"""`GRTrainer`: the `transformers.Trainer` whose `training_step` computes the gradient-regularization gradient.

The math lives in `hf_gr.gradient`; this module orchestrates the two passes inside the Trainer's loop:
gradient accumulation, loss normalization, mixed precision, dropout masks, and data-parallel sync.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from . import checkpoint, gradient, hub, replay
from .arguments import GRTrainingArguments
from .callbacks import WARMUP_CALLBACKS, GRStepState, GRWarmupCallback
from .diagnostics import GradientNormProbe, GRDiagnosticsCallback, SecondPassProbe

logger = logging.getLogger(__name__)


class GRTrainer(Trainer):
    """A `Trainer` that trains with gradient regularization (GR) or SAM, configured by `GRTrainingArguments`.

    Each optimizer step (per micro-batch under gradient accumulation) runs:

    1. pass 1 under `no_sync`: g1 = ∇L(θ), with what earlier micro-batches accumulated put aside;
    2. ε = r·g1/‖g1‖ (global L2 norm over the trainable parameters, in float32), θ ← θ + ε;
    3. `.grad` ← ((1 − α)·g1 + accumulated)/α, then pass 2 at θ + ε with the same dropout mask, whose backward
       adds g2 and (on the sync micro-batch) all-reduces the combined gradient once; then `.grad` ×= α;
    4. θ restored bit for bit from a copy, also when a pass raises.

    A step whose λ or r is 0 (λ = 0, or the zero-warmup phase) is the stock single-pass step. The Trainer's
    clipping, optimizer step and scheduler then run unchanged on `.grad`.

    Logged metrics (with every training log entry, describing the step just taken): `gr_lambda`, `gr_r`.
    """

    args: GRTrainingArguments

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) < 2 and kwargs.get("args") is None:
            kwargs["args"] = GRTrainingArguments(output_dir="tmp_trainer")  # as Trainer does without arguments
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, GRTrainingArguments):
            raise TypeError(f"GRTrainer needs GRTrainingArguments, got {type(self.args).__name__}.")
        self._check_distributed_setup()
        self.gr_step_state = GRStepState(gr_lambda=self.args.gr_lambda, gr_r=self.args.gr_r)
        self._gr_last_step: tuple[float, float] = (self.args.gr_lambda, self.args.gr_r)
        self._bind_warmup_callback()
        self._bind_diagnostics_callback()

    # ---- set-up ----

    def _check_distributed_setup(self) -> None:
        """Refuse, at start-up, the distributed modes the two-pass step cannot run under."""
        if self.is_deepspeed_enabled:
            raise ValueError(
                "GRTrainer does not support DeepSpeed: its engine steps the optimizer inside backward and ZeRO-2/3 "
                "partitions gradients out of `.grad`, so the two-pass GR gradient cannot be formed. Use DDP "
                "(`accelerate launch --multi_gpu` or `torchrun`) instead."
            )
        if self.is_fsdp_enabled:
            raise ValueError(
                "GRTrainer does not support FSDP yet: under `no_sync` FSDP keeps the unsharded gradients outside "
                "`.grad`, so pass 1's g1 cannot be read per shard. Use DDP (`accelerate launch --multi_gpu`)."
            )
        if getattr(self, "is_distributed_loading_by_transformers", False):
            raise ValueError(
                "GRTrainer does not support models sharded or tensor-parallel at load time (`tp_plan`/`device_mesh`): "
                "their gradients are reduced outside the Trainer's `no_sync`. Load the model whole and use DDP."
            )
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        if optim in ("lomo", "adalomo") or optim.endswith("layerwise"):
            raise ValueError(
                f"GRTrainer does not support optim={optim!r}: it updates the weights inside backward, so GR's first "
                "pass would already step the optimizer. Use an optimizer that steps after backward (e.g. adamw_torch)."
            )
        if self.args.gr_method == "exact" and self.accelerator.num_processes > 1:
            raise ValueError(
                "gr_method='exact' (double backprop) is a single-process verification tool; use "
                "gr_method='finite_difference' for multi-process training."
            )

    def _bind_warmup_callback(self) -> None:
        """Bind the warmup callback: one passed in `callbacks` wins over `gr_warmup_strategy`; two are an error."""
        given = [cb for cb in self.callback_handler.callbacks if isinstance(cb, GRWarmupCallback)]
        if len(given) > 1:
            raise ValueError(
                f"GRTrainer got {len(given)} GR warmup callbacks ({', '.join(type(c).__name__ for c in given)}); "
                "pass at most one, or set gr_warmup_strategy instead."
            )
        if given:
            callback = given[0]
            if callback.strategy != self.args.gr_warmup_strategy:
                logger.info(
                    "Using the %s callback passed to GRTrainer instead of gr_warmup_strategy=%r.",
                    type(callback).__name__,
                    self.args.gr_warmup_strategy,
                )
                self.args.gr_warmup_strategy = callback.strategy  # checkpoints and the model card say what ran
            if callback.warmup_steps is not None:
                self.args.gr_warmup_steps = callback.warmup_steps
        elif self.args.gr_warmup_strategy in WARMUP_CALLBACKS:
            callback = WARMUP_CALLBACKS[self.args.gr_warmup_strategy](self.args.gr_warmup_steps)
            self.add_callback(callback)
        else:
            return
        callback.bind(self.gr_step_state)

    def _bind_diagnostics_callback(self) -> None:
        """Add `GRDiagnosticsCallback` when `gr_diagnostics_steps` > 0 (unless one was passed) and bind it."""
        given = [cb for cb in self.callback_handler.callbacks if isinstance(cb, GRDiagnosticsCallback)]
        if not given and self.args.gr_diagnostics_steps > 0:
            given = [GRDiagnosticsCallback(self.args.gr_diagnostics_steps)]
            self.add_callback(given[0])
        for callback in given:
            callback.bind(self.gr_step_state)

    # ---- the training step ----

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One micro-batch: the stock step when λ or r is 0, else the GR gradient added to `.grad`."""
        gr_lambda, gr_r = self.gr_step_state.gr_lambda, self.gr_step_state.gr_r
        self._gr_last_step = (gr_lambda, gr_r)
        if gr_lambda == 0.0 or gr_r == 0.0:
            if self.gr_step_state.record_diagnostics:
                return self._plain_step_with_norm(model, inputs, num_items_in_batch)
            return super().training_step(model, inputs, num_items_in_batch)
        if self.args.gr_method == "exact":
            return self._exact_step(model, inputs, num_items_in_batch, gr_lambda)
        return self._two_pass_step(model, inputs, num_items_in_batch, gr_lambda, gr_r)

    def _two_pass_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None,
        gr_lambda: float,
        gr_r: float,
    ) -> torch.Tensor:
        """The finite-difference GR gradient of one micro-batch, added to `.grad` (see the class docstring)."""
        alpha = gr_lambda / gr_r
        trainable = [p for p in model.parameters() if p.requires_grad]
        accumulated = gradient.take_grads(trainable)  # earlier micro-batches' sum, put aside (no copy)
        rng = replay.rng_state()

        # Pass 1: g1 = ∇L(θ), never synced across replicas.
        try:
            with self.accelerator.no_sync(model):
                loss = super().training_step(model, dict(inputs), num_items_in_batch)
        except BaseException:
            for p, a in zip(trainable, accumulated or [None] * len(trainable)):
                p.grad = a  # lose nothing that earlier micro-batches accumulated
            raise
        distributed = self.accelerator.num_processes > 1
        if self.args.gr_sync_perturbation and distributed:
            self._average_across_replicas(trainable)
        params, grads = gradient.params_with_grads(trainable)
        norm = gradient.global_grad_norm(grads).item()
        scale = gradient.perturbation_scale(norm, gr_r, gradient.norm_floor(grads))
        if scale is None and not distributed:
            # ‖g1‖ zero or not finite: a plain step. An inf/NaN g1 stays in `.grad` so the fp16 scaler skips it.
            gradient.add_back_(trainable, accumulated)
            return loss

        # Pass 2 at θ + ε (at θ when g1 gave no direction: every replica still runs it, so collectives match).
        probe = None
        if self.gr_step_state.record_diagnostics:
            probe = SecondPassProbe(self.gr_step_state, params, grads, norm, self._diagnostics_scale())
        backup = gradient.snapshot(params) if scale is not None else None
        try:
            if backup is not None:
                gradient.perturb_(params, grads, scale)
            gradient.prepare_second_pass_(trainable, alpha, accumulated)
            # g1 (dropped from `.grad` at α = 1) and the put-aside sum now live in `.grad` or nowhere:
            # holding these lists through pass 2 would keep one more parameter-sized buffer alive.
            del accumulated, grads
            replay.set_rng_state(rng)
            with replay.frozen_running_stats(model):
                super().training_step(model, dict(inputs), num_items_in_batch)
            gradient.finish_second_pass_(trainable, alpha)
            self.current_flos += float(self.floating_point_ops(inputs))  # the loop counts one pass
        finally:
            if backup is not None:
                gradient.restore_(params, backup)
            if probe is not None:
                probe.close()
        return loss

    def _plain_step_with_norm(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
    ) -> torch.Tensor:
        """The stock step, measuring this micro-batch's ‖g‖ (this replica's, before any all-reduce)."""
        params = [p for p in model.parameters() if p.requires_grad]
        probe = GradientNormProbe(self.gr_step_state, params, self._diagnostics_scale())
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            probe.close()

    def _exact_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None, gr_lambda: float
    ) -> torch.Tensor:
        """Double backprop: the gradient of L + λ·‖∇L‖₂, for verification on small models."""
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(dict(inputs))
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        loss = self._scale_for_accumulation(loss, num_items_in_batch)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.accelerator.backward(gradient.exact_gr_loss(loss, trainable, gr_lambda))
        return loss.detach()

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the λ and r of the step just taken to every training log entry."""
        if "loss" in logs:
            logs["gr_lambda"], logs["gr_r"] = self._gr_last_step
            logs.update(self.gr_step_state.diagnostics)
            self.gr_step_state.diagnostics.clear()
        super().log(logs, *args, **kwargs)

    # ---- model card ----

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The Trainer's card (also written by `push_to_hub`) plus an `hf_gr` metadata block, GR tags and section.

        `dataset` and `finetuned_from` (the base model; None for a model trained from scratch) go into the card.
        """
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            dataset = kwargs.get("dataset")
            metadata = hub.gr_card_metadata(
                self.args,
                self.state,
                dataset[0] if isinstance(dataset, list) else dataset,
                kwargs.get("finetuned_from"),
            )
            hub.add_gr_to_model_card(os.path.join(self.args.output_dir, "README.md"), metadata)

    # ---- checkpoints ----

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume the weights through transformers' key conversion (the stock loader skips renamed keys)."""
        target = self.model if model is None else model
        if self._plain_weights() and checkpoint.load_converted_weights(target, resume_from_checkpoint):
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """Load the best checkpoint's weights through the key conversion, like `_load_from_checkpoint`."""
        best = self.state.best_model_checkpoint
        if self._plain_weights() and checkpoint.load_converted_weights(self.model, best):
            logger.info("Loaded best model from %s (score: %s).", best, self.state.best_metric)
            return
        super()._load_best_model()

    def _plain_weights(self) -> bool:
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    # ---- helpers ----

    def _scale_for_accumulation(
        self, loss: torch.Tensor, num_items_in_batch: torch.Tensor | int | None
    ) -> torch.Tensor:
        """Divide by the accumulation steps unless the loss is already normalized (as the stock step does)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        if scaled:
            return loss
        return loss / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def _average_across_replicas(self, trainable: list[torch.Tensor]) -> None:
        """g1 ← its mean over the replicas, in one all-reduce (for `gr_sync_perturbation`).

        A parameter without a gradient on this replica takes part with zeros, so all replicas reduce alike.
        """
        for p in trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in trainable]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.accelerator.reduce(flat, reduction="mean")
        chunks = torch.split(flat, [g.numel() for g in grads])
        torch._foreach_copy_(grads, [c.view_as(g) for c, g in zip(chunks, grads)])

    def _diagnostics_scale(self) -> float:
        """What divides a raw gradient norm into one batch's: the fp16 loss scale over the accumulation steps."""
        scaler = getattr(self.accelerator, "scaler", None)
        loss_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return loss_scale / steps

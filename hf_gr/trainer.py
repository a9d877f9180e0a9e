"""`GRMixin`: gradient regularization for any `transformers.Trainer` subclass, and `GRTrainer = GRMixin + Trainer`.

    class GRSFTTrainer(GRMixin, SFTTrainer): ...          # with @dataclass class GRSFTConfig(GRArguments, SFTConfig)

The math lives in `hf_gr.gradient`, the passes in `hf_gr.regularizer`, which steps are GR steps in
`hf_gr.schedule`. This module wires them into the Trainer's loop: the plan of each optimizer step (warmup on the
LR schedule's step count, then interval, probability, reuse), the second pass's bookkeeping, the metrics logged,
the checks at start-up, and what a checkpoint holds.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from accelerate.utils.environment import parse_flag_from_env
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from . import ascent, checkpoint, gradient, hub, record, schedule, sync
from .arguments import GRArguments, GRTrainingArguments, optimizer_name, validate_gr_arguments
from .callbacks import WARMUP_CALLBACKS, GRWarmupCallback
from .diagnostics import GradientNormProbe, GRDiagnosticsCallback, GRMetrics
from .regularizer import GradientRegularizer
from .schedule import GR, REUSE, StepPlan

logger = logging.getLogger(__name__)

GR_STATE_NAME = "gr_state.pt"
# The Trainer internals GR relies on;
# `tests/test_layout.py::test_trainer_internals_gr_relies_on_still_exist` checks that they still exist.
TRAINER_INTERNALS = (
    "current_gradient_accumulation_steps",
    "_load_from_checkpoint",
    "_load_best_model",
)


class GRMixin:
    """Gradient regularization (GR) or SAM for any `Trainer` subclass: put it first, `class X(GRMixin, Trainer)`.

    Each optimizer step is planned once (`hf_gr.schedule`): λ_t and r_t from the warmup strategy on the LR
    schedule's step count, then `gr_interval`, `gr_probability` and `gr_reuse` pick GR, plain or reuse steps.
    A GR step's micro-batches run `GradientRegularizer`'s two passes around the parent's own `training_step`
    (so its loss scaling, mixed precision and `compute_loss` apply to both); the others run the parent's step
    once. The Trainer's clipping, optimizer step and scheduler then run unchanged on `.grad`. With
    `gr_method="exact"` the parent's step runs once, with λ·‖∇L‖₂ added to whatever its `compute_loss` returns.

    At train start it logs how GR runs (single process, DDP or FSDP2 over N processes, and whether the perturbation
    is per replica or synced), and every checkpoint records the GR settings in force with the optimizer steps they
    ran for (`hf_gr.record`); a resume with other settings warns, naming each change.

    Logged with every training log entry: `gr_lambda` and `gr_r` (what the last step applied; λ = 0 on a plain or
    reuse step), `gr_step_fraction` and `gr_reuse_fraction` (the share of optimizer steps since the last log that
    were GR and reuse steps), `gr_degenerate_fraction` (the share of GR micro-batches whose ‖g1‖ gave no direction,
    so that they ran as plain steps; warned about once when non-zero), and the diagnostics of
    `GRDiagnosticsCallback` when it measured. After a GR step whose pass 1 saw the whole batch: `gr_sharpness`,
    L(θ + ε) − L(θ) of the step's batch (pass 2's loss less pass 1's, in the units of the logged `loss`), averaged
    over the GR steps since the last log and over the replicas; it costs no extra pass and no host sync.

    With `gr_ascent_fraction` < 1 pass 1 runs on the first ⌈f·B⌉ samples of each micro-batch (`hf_gr.ascent`),
    passing `num_items_in_batch` on unchanged (only the direction of its g1 is used, and a direction does not
    depend on the loss's normalization); pass 2 runs on the whole micro-batch. The loss such a step returns (and
    logs) is then pass 2's, L(θ + ε) on the whole micro-batch, what the parent records per `compute_loss` call
    (TRL's metrics, token counts) is pass 2's, and the diagnostics' ‖g1‖ and cos(g1, g2) are of the sub-batch's g1.
    """

    args: GRArguments

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse, when the class is defined, a base order in which a Trainer's own step, log or train run first."""
        super().__init_subclass__(**kwargs)
        _check_mixin_comes_first(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, GRArguments):
            raise TypeError(
                f"{type(self).__name__} needs arguments with the GR fields, got {type(self.args).__name__}: use "
                "GRTrainingArguments, or combine them, e.g. `@dataclass class MyConfig(GRArguments, SFTConfig)`."
            )
        validate_gr_arguments(self.args)
        self._gr_check_setup()
        self.gr_regularizer = GradientRegularizer(self.model, self.accelerator, self.args, seed=self.args.seed)
        self.gr_metrics = GRMetrics()
        self._gr_plan: StepPlan | None = None
        self._gr_sharpness: torch.Tensor | None = None  # Σ over the step's micro-batches of L(θ + ε) − L(θ)
        self._gr_last_plan = StepPlan(GR, self.args.gr_lambda, self.args.gr_r)
        self._gr_user_scheduler = self.lr_scheduler is not None
        self._gr_warned_scheduler = False
        self.gr_warmup = self._gr_bind_warmup_callback()
        given = [cb for cb in self.callback_handler.callbacks if isinstance(cb, GRDiagnosticsCallback)]
        if not given and self.args.gr_diagnostics_steps > 0:
            given = [GRDiagnosticsCallback(self.args.gr_diagnostics_steps)]
            self.add_callback(given[0])
        for callback in given:
            callback._bind(self.gr_metrics)
        self.add_callback(_GRStepCallback(self))
        self.add_callback(record.GRSettingsRecord())

    # ---- set-up ----

    def _gr_check_setup(self) -> None:
        """Refuse, at start-up, what the two-pass step cannot run under, naming what to use instead."""
        if self.is_deepspeed_enabled:
            raise ValueError(
                "GR does not support DeepSpeed: its engine steps the optimizer inside backward and ZeRO-2/3 "
                "partitions gradients out of `.grad`, so the two-pass GR gradient cannot be formed. Use DDP "
                "(`accelerate launch --multi_gpu`) or FSDP2 (`fsdp_version: 2`) instead."
            )
        if self.is_fsdp_enabled and getattr(self.accelerator, "is_fsdp2", False) is not True:
            raise ValueError(
                "GR does not support FSDP1: under FSDP1 the sharded g1 cannot be read per shard. Use FSDP2: "
                "`fsdp_version: 2` in the accelerate config (configs/accelerate/fsdp2.yaml) or "
                "fsdp_config={'fsdp_version': 2}."
            )
        asked = "fsdp in the arguments" if self.args.fsdp else None
        if asked is None and parse_flag_from_env("ACCELERATE_USE_FSDP"):
            asked = "the accelerate config"
        if asked and not self.is_fsdp_enabled and self.is_local_process_zero():
            logger.warning(
                "FSDP was asked for (%s) but the run is %s: accelerate shards only on accelerators (not on CPU or "
                "with use_cpu), so GR runs unsharded.", asked, self._gr_mode(),
            )  # fmt: skip
        # What the Trainer itself reads (transformers >= 5.24); older versions shard nothing at load time.
        loaded_distributed = getattr(self.model, "is_distributed_loading_by_transformers", False)
        if loaded_distributed and not _is_fsdp_only(self.model):
            raise ValueError(
                "GR does not support models sharded or tensor-parallel at load time (`tp_plan`/`device_mesh`) "
                "other than plain FSDP2 (`DistributedConfig(fsdp_size=...)` alone): their gradients are reduced "
                "outside the Trainer's `no_sync`. Load the model whole and use DDP or FSDP2."
            )
        optim = optimizer_name(self.args)
        if optim in ("lomo", "adalomo") or optim.endswith("layerwise"):
            raise ValueError(
                f"GR does not support optim={optim!r}: it updates the weights inside backward, so GR's first "
                "pass would already step the optimizer. Use an optimizer that steps after backward (e.g. adamw_torch)."
            )
        if self.args.gr_method == "exact" and self.accelerator.num_processes > 1:
            raise ValueError(
                "gr_method='exact' (double backprop) is a single-process verification tool; use "
                "gr_method='finite_difference' for multi-process training."
            )
        if self.args.gr_first_term == "normalized" and (self.args.gradient_accumulation_steps > 1 or self.args.fp16):
            raise ValueError(
                "gr_first_term='normalized' (the official code's g1/‖g1‖) is defined for one micro-batch without "
                "loss scaling: use gradient_accumulation_steps=1 and no fp16, or gr_first_term='raw'."
            )

    def _gr_bind_warmup_callback(self) -> GRWarmupCallback | None:
        """The warmup strategy: one passed in `callbacks` wins over `gr_warmup_strategy`; two are an error."""
        given = [cb for cb in self.callback_handler.callbacks if isinstance(cb, GRWarmupCallback)]
        if len(given) > 1:
            raise ValueError(
                f"{type(self).__name__} got {len(given)} GR warmup callbacks "
                f"({', '.join(type(c).__name__ for c in given)}); pass at most one, or set gr_warmup_strategy."
            )
        if given:
            callback = given[0]
            if callback.strategy is None and type(callback).coefficients is GRWarmupCallback.coefficients:
                raise ValueError(
                    f"{type(callback).__name__} is not a warmup strategy: pass LambdaWarmupCallback, RWarmupCallback "
                    "or ZeroWarmupCallback (or a subclass that defines `coefficients`)."
                )
            if callback.strategy is not None and callback.strategy != self.args.gr_warmup_strategy:
                logger.info("Using the %s passed in callbacks instead of gr_warmup_strategy=%r.",
                            type(callback).__name__, self.args.gr_warmup_strategy)  # fmt: skip
                self.args.gr_warmup_strategy = callback.strategy  # checkpoints and the model card say what ran
            if callback.warmup_steps is not None:
                self.args.gr_warmup_steps = callback.warmup_steps
            return callback
        if self.args.gr_warmup_strategy in WARMUP_CALLBACKS:
            callback = WARMUP_CALLBACKS[self.args.gr_warmup_strategy]()
            self.add_callback(callback)
            return callback
        return None

    # ---- the plan of each optimizer step ----

    def gr_warmup_length(self) -> int:
        """W: `gr_warmup_steps`, else the LR warmup of the run (read from a scheduler the user passed, if it can)."""
        if self.args.gr_warmup_steps is not None:
            return int(self.args.gr_warmup_steps)
        max_steps = self.state.max_steps or self.args.max_steps
        if self._gr_user_scheduler and self.lr_scheduler is not None:
            found = schedule.scheduler_warmup_steps(self.lr_scheduler)
            if found is not None:
                return found
            if not self._gr_warned_scheduler:
                self._gr_warned_scheduler = True
                logger.warning(
                    "Cannot tell the LR warmup of the %s passed in `optimizers`; the GR warmup uses W = %d from "
                    "warmup_steps. Set gr_warmup_steps to your scheduler's warmup length.",
                    type(self.lr_scheduler).__name__, self.args.get_warmup_steps(max_steps) if max_steps > 0 else 0,
                )  # fmt: skip
        return self.args.get_warmup_steps(max_steps) if max_steps > 0 else 0

    def _gr_step_plan(self) -> StepPlan:
        """The plan of the optimizer step that starts now (computed at its first micro-batch, then kept)."""
        if self._gr_plan is None:
            fraction = schedule.warmup_fraction(self._gr_schedule_step(), self.gr_warmup_length())
            gr_lambda, gr_r = self._gr_coefficients(fraction)
            if self.args.gr_probability_end is not None and self.gr_regularizer._ramp is None:
                self._gr_set_probability_ramp()
            self._gr_plan = self.gr_regularizer._plan_from(gr_lambda, gr_r, self.state.global_step)
        return self._gr_plan

    def _gr_coefficients(self, fraction: float) -> tuple[float, float]:
        """(λ_t, r_t) at warmup fraction f(t), from the warmup callback or `gr_warmup_strategy`."""
        a = self.args
        if self.gr_warmup is not None:
            return self.gr_warmup.coefficients(a.gr_lambda, a.gr_r, fraction)
        return schedule.warmup_coefficients(a.gr_warmup_strategy, a.gr_lambda, a.gr_r, fraction)

    def _gr_set_probability_ramp(self) -> None:
        """`gr_probability_end`: p ramps from the first eligible step to the last of the run's `max_steps`."""
        first = schedule.first_eligible_step(self._gr_coefficients, self.gr_warmup_length())
        self.gr_regularizer._ramp = (first, int(self.state.max_steps or self.args.max_steps))

    def _gr_schedule_step(self) -> int:
        """t of the warmup: the LR scheduler's step count (it does not advance on a step the fp16 scaler skips)."""
        return schedule.scheduler_step(self.lr_scheduler, default=self.state.global_step)

    # ---- the training step ----

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One micro-batch: the parent's step once (plain, reuse) or twice around the GR bookkeeping (GR)."""
        plan = self._gr_step_plan()
        self._gr_last_plan = plan
        parent = super().training_step
        if plan.kind == GR and self.args.gr_method == "exact":
            return self._gr_exact_step(parent, model, inputs, num_items_in_batch, plan.gr_lambda)
        regularizer = self.gr_regularizer
        regularizer.model, regularizer.args = model, self.args  # `hyperparameter_search` may swap either
        recording = self.gr_metrics.recording
        regularizer.metrics = self.gr_metrics.add if recording else None
        if recording:
            regularizer.diagnostics_scale = self._gr_diagnostics_scale()
        fraction = ascent.pass_fraction(plan, self.args.gr_ascent_fraction)
        first_inputs = inputs if fraction == 1.0 else ascent.ascent_inputs(inputs, fraction)
        losses: list[torch.Tensor] = []

        def one_pass(batch: dict[str, Any], counted: bool) -> torch.Tensor:
            with contextlib.nullcontext() if counted else self._gr_uncounted_pass():
                losses.append(parent(model, dict(batch), num_items_in_batch))
            return losses[-1]

        # Per-call records count the whole micro-batch once: pass 1's, or pass 2's when pass 1 saw a sub-batch.
        def run_pass() -> torch.Tensor:
            return one_pass(inputs, counted=not losses or fraction < 1.0)

        def ascent_pass() -> torch.Tensor:
            return one_pass(first_inputs, counted=False)

        if recording and plan.kind != GR:
            trainable = [p for p in model.parameters() if p.requires_grad]
            with GradientNormProbe(trainable, regularizer.diagnostics_scale, self.gr_metrics.add):
                loss = regularizer._micro_batch(run_pass, plan, self.accelerator.sync_gradients)
        else:
            loss = regularizer._micro_batch(
                run_pass, plan, self.accelerator.sync_gradients, ascent_pass if fraction < 1.0 else None
            )
        if len(losses) == 2:
            self.current_flos += float(self.floating_point_ops(first_inputs))  # the loop counts one pass
            if fraction < 1.0:
                return losses[1]  # the whole micro-batch's (at θ + ε): pass 1 saw part of it
            sharpness = losses[1] - losses[0]  # on the device: no host sync
            self._gr_sharpness = sharpness if self._gr_sharpness is None else self._gr_sharpness + sharpness
        return loss

    def _gr_exact_step(self, parent: Any, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any,
                       gr_lambda: float) -> torch.Tensor:  # fmt: skip
        """`gr_method="exact"`: the parent's step with λ·‖∇L‖₂ added to whatever `compute_loss` returns.

        The `compute_loss` the parent calls (the user's own, with or without `super()`) is wrapped for this call only.
        """
        own = self.__dict__.get("compute_loss")
        compute_loss = self.compute_loss
        calls = 0

        def with_penalty(loss_model: nn.Module, *args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            result = compute_loss(loss_model, *args, **kwargs)
            loss, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, None)
            trainable = [p for p in loss_model.parameters() if p.requires_grad]
            loss = gradient.exact_gr_loss(loss, trainable, gr_lambda)
            return loss if rest is None else (loss, *rest)

        self.compute_loss = with_penalty  # type: ignore[method-assign]
        try:
            loss = parent(model, inputs, num_items_in_batch)
        finally:
            if own is None:
                del self.compute_loss
            else:
                self.compute_loss = own  # type: ignore[method-assign]
        if calls == 0:
            raise RuntimeError(
                f"gr_method='exact' adds λ·‖∇L‖ to the loss that `compute_loss` returns, but the training_step "
                f"{type(self).__name__} inherits never called it: use gr_method='finite_difference'."
            )
        return loss

    @contextlib.contextmanager
    def _gr_uncounted_pass(self) -> Iterator[None]:
        """What the parent records per `compute_loss` call (TRL's `_metrics`, token counts) during this pass is
        dropped, so that each micro-batch counts once."""
        metrics = getattr(self, "_metrics", None)
        saved_metrics = None
        if isinstance(metrics, dict):
            saved_metrics = {mode: {k: list(v) for k, v in values.items()} for mode, values in metrics.items()
                             if isinstance(values, dict)}  # fmt: skip
        tokens = getattr(self, "_total_train_tokens", None)
        try:
            yield
        finally:
            if saved_metrics is not None:
                for mode, values in saved_metrics.items():
                    metrics[mode].clear()
                    metrics[mode].update(values)
            if tokens is not None:
                self._total_train_tokens = tokens

    def _gr_diagnostics_scale(self) -> float:
        """What divides a raw gradient norm into one batch's: the fp16 loss scale over the accumulation steps."""
        scaler = getattr(self.accelerator, "scaler", None)
        loss_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        return loss_scale / self.current_gradient_accumulation_steps

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add GR's metrics to every training log entry (the step's λ, r; the fractions; the diagnostics)."""
        if "loss" in logs:
            logs["gr_lambda"], logs["gr_r"] = self._gr_last_plan.gr_lambda, self._gr_last_plan.gr_r
            degenerate = self.gr_regularizer._pop_degenerate_fraction()
            if degenerate is not None:
                self.gr_metrics.add("gr_degenerate_fraction", degenerate)
            logs.update(self.gr_metrics.pop_means(self.args.device if self.args.world_size > 1 else None))
        super().log(logs, *args, **kwargs)

    # ---- train, checkpoints, model card ----

    def _gr_begin_training(self, state: Any) -> None:
        """At train start: say how GR runs, warn about W = 0, and record the settings (warning when a resume
        changed them)."""
        main = self.is_local_process_zero()
        if self.args.gr_probability_end is not None:
            self._gr_set_probability_ramp()
        if main:
            logger.info("GR: %s.", self._gr_mode())
        if main and self.gr_warmup is not None and self.gr_warmup_length() == 0:
            logger.warning("%s-warmup has W = 0 (no LR warmup and no gr_warmup_steps): full GR from the first step.",
                           self.gr_warmup.strategy)  # fmt: skip
        settings = record.settings_of(self.args, self.gr_warmup_length())
        recorded = self._gr_record()
        changed = recorded.start(state, settings)
        if main and recorded.segments[0]["first_step"] > 1:
            logger.warning(
                "The checkpoint at step %d holds no record of the GR settings its steps ran with: the checkpoints and "
                "the model card record steps %d onwards only.", state.global_step, state.global_step + 1,
            )  # fmt: skip
        if main and changed:
            logger.warning(
                "Resuming at step %d with changed GR settings: %s. The checkpoints and the model card record each "
                "setting with the steps it ran.", state.global_step, "; ".join(changed),
            )  # fmt: skip

    def _gr_mode(self) -> str:
        """How the GR step runs here: the process layout and where the perturbation's g1 comes from."""
        processes = self.accelerator.num_processes
        if processes == 1:
            return "single process"
        if self.is_fsdp_enabled or sync.is_sharded([p for p in self.model.parameters() if p.requires_grad]):
            return f"FSDP2 over {processes} processes, perturbation synced (FSDP2 reduces g1 across replicas)"
        if self.args.gr_sync_perturbation:
            return f"DDP over {processes} processes, perturbation synced (the replica-mean g1, gr_sync_perturbation)"
        return f"DDP over {processes} processes, perturbation per replica (each replica's own g1)"

    def _gr_record(self) -> record.GRSettingsRecord:
        """The settings record among the callbacks (the Trainer may swap in a restored one on resume)."""
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, record.GRSettingsRecord))

    def train(
        self, resume_from_checkpoint: str | os.PathLike | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """The Trainer's `train`, restoring GR's own state (the kept reuse direction) when resuming."""
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if isinstance(path, str):
            state = os.path.join(path, _gr_state_name(self.args.process_index, self.args.world_size))
            if os.path.isfile(state):
                self.gr_regularizer.load_state_dict(torch.load(state, map_location="cpu", weights_only=True))
        self._gr_plan = None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _gr_save_state(self, folder: str) -> None:
        if self.args.gr_reuse and os.path.isdir(folder):
            name = _gr_state_name(self.args.process_index, self.args.world_size)
            torch.save(self.gr_regularizer.state_dict(), os.path.join(folder, name))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """The stock loader, unless transformers' load-time key renaming bites (see `hf_gr.checkpoint`)."""
        target = self.model if model is None else model
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled) and checkpoint.load_renamed_weights(
            target, resume_from_checkpoint
        ):
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """The stock loader, unless transformers' load-time key renaming bites (see `hf_gr.checkpoint`)."""
        best = self.state.best_model_checkpoint
        plain = not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
        if plain and checkpoint.load_renamed_weights(self.model, best):
            logger.info("Loaded best model from %s (score: %s).", best, self.state.best_metric)
            return
        super()._load_best_model()

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The Trainer's card (also written by `push_to_hub`) plus an `hf_gr` metadata block, GR tags and section.

        `dataset` and `finetuned_from` (the base model; None for a model trained from scratch) go into the card.
        """
        with _from_scratch_card(self.model, kwargs.get("finetuned_from")):
            super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            dataset = kwargs.get("dataset")
            metadata = hub.gr_card_metadata(
                self.args, self.state, self.gr_warmup_length(), dataset[0] if isinstance(dataset, list) else dataset,
                kwargs.get("finetuned_from"), self._gr_record().segments,
            )  # fmt: skip
            hub.add_gr_to_model_card(os.path.join(self.args.output_dir, "README.md"), metadata)


def _check_mixin_comes_first(cls: type) -> None:
    """Raise when a `Trainer` (sub)class precedes `GRMixin` in `cls`'s MRO with its own version of a method GR
    overrides (`__init__`, `training_step`, `log`, `train`, ...): that one is reached first, and `Trainer`'s own never
    call `super()` (not even `__init__`), so the model would train plain without a word."""
    mro = cls.__mro__
    before = [c for c in mro[: mro.index(GRMixin)] if issubclass(c, Trainer) and not issubclass(c, GRMixin)]
    overridden = [name for name, value in vars(GRMixin).items() if callable(value) and name != "__init_subclass__"]
    reached = {name: _first_definer(mro, name) for name in overridden}
    bypassed = [name for name, owner in reached.items() if owner in before]
    if not bypassed:
        return
    owner = reached[bypassed[0]]
    ordered = sorted(cls.__bases__, key=lambda b: not issubclass(b, GRMixin))  # stable: the GR base(s) first
    verb = "is" if len(bypassed) == 1 else "are"
    raise TypeError(
        f"{cls.__name__} puts {owner.__name__} before GRMixin in its bases, so {owner.__name__}'s "
        f"{', '.join(bypassed)} {verb} reached before GR's and the model may train without GR: put GR first, "
        f"`class {cls.__name__}({', '.join(b.__name__ for b in ordered)})`."
    )


def _first_definer(mro: tuple[type, ...], name: str) -> type | None:
    return next((c for c in mro if name in vars(c)), None)


class GRTrainer(GRMixin, Trainer):
    """A `Trainer` that trains with gradient regularization (GR) or SAM, configured by `GRTrainingArguments`.

    See `GRMixin` for the step and the logged metrics.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) < 2 and kwargs.get("args") is None:
            kwargs["args"] = GRTrainingArguments(output_dir="tmp_trainer")  # as Trainer does without arguments
        super().__init__(*args, **kwargs)


class _GRStepCallback(TrainerCallback):
    """The mixin's own bookkeeping per optimizer step: a new plan, the step counts, W's warning, GR's state."""

    def __init__(self, trainer: GRMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._gr_begin_training(state)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._gr_plan = None
        self.trainer._gr_sharpness = None
        self.trainer.gr_regularizer._start_step()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        kind = trainer._gr_last_plan.kind
        trainer.gr_metrics.add("gr_step_fraction", float(kind == GR))
        trainer.gr_metrics.add("gr_reuse_fraction", float(kind == REUSE))
        if kind == GR and trainer._gr_sharpness is not None:
            trainer.gr_metrics.add("gr_sharpness", trainer._gr_sharpness)
        trainer._gr_plan = None
        trainer._gr_sharpness = None

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._gr_save_state(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


@contextlib.contextmanager
def _from_scratch_card(model: nn.Module, finetuned_from: str | None) -> Iterator[None]:
    """Let the Trainer's card say "trained from scratch" for a model without a base.

    `TrainingSummary.from_trainer` takes the base from `config._name_or_path` unless that is a directory; for a
    model built from a config it is "", and the card would link a fine-tuned version of "[]". "." is a directory.
    """
    config = getattr(model, "config", None)
    if finetuned_from is not None or config is None or getattr(config, "_name_or_path", None):
        yield
        return
    config._name_or_path = os.curdir
    try:
        yield
    finally:
        config._name_or_path = ""


def _is_fsdp_only(model: nn.Module) -> bool:
    """Whether a model distributed at load time (`from_pretrained(distributed_config=...)`) is only FSDP2-sharded."""
    config = getattr(getattr(model, "config", None), "distributed_config", None)
    if config is None:
        return False
    others = ("tp_size", "pp_size", "ep_size", "dp_replicate_size")
    return all(getattr(config, name, 1) in (None, 1) for name in others) and getattr(config, "fsdp_size", 1) > 1


def _gr_state_name(process_index: int, world_size: int) -> str:
    return GR_STATE_NAME if world_size <= 1 else f"gr_state_{process_index}.pt"

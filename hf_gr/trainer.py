"""`GRMixin`: gradient regularization for any `transformers.Trainer` subclass, and `GRTrainer = GRMixin + Trainer`.

    class GRSFTTrainer(GRMixin, SFTTrainer): ...          # with @dataclass class GRSFTConfig(GRArguments, SFTConfig)

A GR step as the Trainer runs it: **plan** (`schedule.StepPlanner`, once per optimizer step, on the LR
schedule's step count) → **passes** (`passes.GRPasses`, per micro-batch, around the parent's own
`training_step`) → **combine** (`combine`, into `.grad`) → **record** (the metrics logged, `gr_sharpness`,
the settings record and GR's checkpoint state). This module wires them into the Trainer's loop, with the checks at
start-up; the math is in `gradient`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ._internal import ascent, checkpoint, gradient, hub, metrics, record, schedule, setup
from ._internal.metrics import GradientNormProbe, GRMetrics
from ._internal.passes import GRPasses
from ._internal.schedule import GR, REUSE, StepPlan, StepPlanner
from .arguments import GRArguments, GRTrainingArguments, validate_gr_arguments
from .diagnostics import GRDiagnosticsCallback

logger = logging.getLogger(__name__)

__all__ = ["GRMixin", "GRTrainer"]

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

    Each optimizer step is planned once (`schedule`): λ_t and r_t from the warmup strategy on the LR
    schedule's step count, then `gr_interval`, `gr_probability` and `gr_reuse` pick GR, plain or reuse steps.
    A GR step's micro-batches run `GradientRegularizer`'s two passes around the parent's own `training_step`
    (so its loss scaling, mixed precision and `compute_loss` apply to both); the others run the parent's step
    once. The Trainer's clipping, optimizer step and scheduler then run unchanged on `.grad`. With
    `gr_method="exact"` the parent's step runs once, with λ·‖∇L‖₂ added to whatever its `compute_loss` returns.

    At train start it logs how GR runs (single process, DDP or FSDP2 over N processes, and whether the perturbation
    is per replica or synced), and every checkpoint records the GR settings in force with the optimizer steps they
    ran for (`record`); a resume with other settings warns, naming each change.

    Logged with every training log entry: `gr_lambda` and `gr_r` (what the last step applied; λ = 0 on a plain or
    reuse step), `gr_step_fraction` and `gr_reuse_fraction` (the share of optimizer steps since the last log that
    were GR and reuse steps), `gr_degenerate_fraction` (the share of GR micro-batches whose ‖g1‖ gave no direction,
    so that they ran as plain steps; warned about once when non-zero), and the diagnostics of
    `GRDiagnosticsCallback` when it measured. After a GR step whose pass 1 saw the whole batch: `gr_sharpness`,
    L(θ + ε) − L(θ) of the step's batch (pass 2's loss less pass 1's, in the units of the logged `loss`), averaged
    over the GR steps since the last log and over the replicas; it costs no extra pass and no host sync.

    With `gr_ascent_fraction` < 1 pass 1 runs on the first ⌈f·B⌉ samples of each micro-batch (`ascent`),
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
        self.args.warn_if_alpha_extrapolates(stacklevel=3)  # λ or r may have changed since they were built
        setup.refuse_unsupported(self)
        self.gr_warmup = setup.bind_warmup_callback(self)
        warmup = self.gr_warmup.coefficients if self.gr_warmup is not None else None
        self.gr_planner = StepPlanner(self.args, self.args.seed, coefficients=warmup)
        self.gr_passes = GRPasses(self.model, self.accelerator, self.args)
        self.gr_metrics = GRMetrics()
        self._gr_plan: StepPlan | None = None  # the current step's, made at its first micro-batch
        self._gr_last_plan = StepPlan(GR, self.args.gr_lambda, self.args.gr_r)  # what the last step applied
        self._gr_sharpness: torch.Tensor | None = None  # Σ over the step's micro-batches of L(θ + ε) − L(θ)
        self._gr_user_scheduler = self.lr_scheduler is not None
        self._gr_warned_scheduler = False
        given = [cb for cb in self.callback_handler.callbacks if isinstance(cb, GRDiagnosticsCallback)]
        if not given and self.args.gr_diagnostics_steps > 0:
            given = [GRDiagnosticsCallback(self.args.gr_diagnostics_steps)]
            self.add_callback(given[0])
        for callback in given:
            callback.bind(self.gr_metrics)
        self.add_callback(_GRStepCallback(self._gr_begin_training, self._gr_start_step, self._gr_end_step,
                                          self._gr_save_state))  # fmt: skip
        self.add_callback(record.GRSettingsRecord())

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
            self.gr_planner.args = self.args  # `hyperparameter_search` may swap the arguments
            warmup_step = schedule.scheduler_step(self.lr_scheduler, default=self.state.global_step)
            total = int(self.state.max_steps or self.args.max_steps)
            self._gr_plan = self.gr_planner.plan(self.state.global_step, warmup_step, self.gr_warmup_length(), total)
        return self._gr_plan

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
            return _exact_step(self, parent, model, inputs, num_items_in_batch, plan.gr_lambda)
        passes = self.gr_passes
        passes.model, passes.args = model, self.args  # `hyperparameter_search` may swap either
        recording = self.gr_metrics.recording
        scale = self._gr_diagnostics_scale() if recording else 1.0
        fraction = ascent.pass_fraction(plan, self.args.gr_ascent_fraction)
        first_inputs = inputs if fraction == 1.0 else ascent.ascent_inputs(inputs, fraction)
        losses: list[torch.Tensor] = []

        def one_pass(batch: dict[str, Any], counted: bool) -> torch.Tensor:
            with contextlib.nullcontext() if counted else _uncounted_pass(self):
                losses.append(parent(model, dict(batch), num_items_in_batch))
            return losses[-1]

        # Per-call records count the whole micro-batch once: pass 1's, or pass 2's when pass 1 saw a sub-batch.
        def run_pass() -> torch.Tensor:
            return one_pass(inputs, counted=not losses or fraction < 1.0)

        def ascent_pass() -> torch.Tensor:
            return one_pass(first_inputs, counted=False)

        last = self.accelerator.sync_gradients
        if recording and plan.kind != GR:  # ‖g‖ of a plain or reuse step, measured by gradient hooks
            with GradientNormProbe(passes.trainable(), scale, self.gr_metrics.add):
                loss = passes.run(run_pass, plan, last)
        else:
            record_to = self.gr_metrics.add if recording else None
            loss = passes.run(run_pass, plan, last, ascent_pass if fraction < 1.0 else None, record_to, scale)
        if len(losses) == 2:
            self.current_flos += float(self.floating_point_ops(first_inputs))  # the loop counts one pass
            if fraction < 1.0:
                return losses[1]  # the whole micro-batch's (at θ + ε): pass 1 saw part of it
            sharpness = metrics.perturbed_loss_rise(losses[0], losses[1])  # on the device: no host sync
            self._gr_sharpness = sharpness if self._gr_sharpness is None else self._gr_sharpness + sharpness
        return loss

    def _gr_diagnostics_scale(self) -> float:
        """What divides a raw gradient norm into one batch's: the fp16 loss scale over the accumulation steps."""
        scaler = getattr(self.accelerator, "scaler", None)
        loss_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        return loss_scale / self.current_gradient_accumulation_steps

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add GR's metrics to every training log entry (the step's λ, r; the fractions; the diagnostics)."""
        if "loss" in logs:
            logs["gr_lambda"], logs["gr_r"] = self._gr_last_plan.gr_lambda, self._gr_last_plan.gr_r
            degenerate = self.gr_passes.pop_degenerate_fraction()
            if degenerate is not None:
                self.gr_metrics.add("gr_degenerate_fraction", degenerate)
            logs.update(self.gr_metrics.pop_means(self.args.device if self.args.world_size > 1 else None))
        super().log(logs, *args, **kwargs)

    # ---- train, checkpoints, model card ----

    def _gr_begin_training(self, state: Any) -> None:
        """At train start: say how GR runs, warn about W = 0, and record the settings (warning when a resume
        changed them)."""
        main = self.is_local_process_zero()
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # this train()'s model (`model_init`)
        self.gr_passes.begin_training(self.optimizer, trainable)  # D, with previous_step: each step's gradient
        if main:
            logger.info("GR: %s.", setup.mode(self))
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
                self.gr_passes.load_state_dict(torch.load(state, map_location="cpu", weights_only=True))
        self._gr_plan = None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _gr_start_step(self) -> None:
        """A new optimizer step: a new plan at its first micro-batch."""
        self._gr_plan = None
        self._gr_sharpness = None
        self.gr_passes.start_step()

    def _gr_end_step(self) -> None:
        """Record what the step was (GR, reuse) and its sharpness."""
        self.gr_passes.end_step()
        kind = self._gr_last_plan.kind
        self.gr_metrics.add("gr_step_fraction", float(kind == GR))
        self.gr_metrics.add("gr_reuse_fraction", float(kind == REUSE))
        if kind == GR and self._gr_sharpness is not None:
            self.gr_metrics.add("gr_sharpness", self._gr_sharpness)
        self._gr_plan = None
        self._gr_sharpness = None

    def _gr_save_state(self, folder: str) -> None:
        if (self.args.gr_reuse or self.args.gr_ascent_direction == "previous_step") and os.path.isdir(folder):
            name = _gr_state_name(self.args.process_index, self.args.world_size)
            torch.save(self.gr_passes.state_dict(), os.path.join(folder, name))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """The stock loader, unless transformers' load-time key renaming bites (see `checkpoint`)."""
        target = self.model if model is None else model
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled) and checkpoint.load_renamed_weights(
            target, resume_from_checkpoint
        ):
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """The stock loader, unless transformers' load-time key renaming bites (see `checkpoint`)."""
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


def _exact_step(trainer: Any, parent: Any, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any,
                gr_lambda: float) -> torch.Tensor:  # fmt: skip
    """`gr_method="exact"`: the parent's step with λ·‖∇L‖₂ added to whatever `compute_loss` returns.

    The `compute_loss` the parent calls (the user's own, with or without `super()`) is wrapped for this call only.
    A parent that never calls it is refused after its step, with `.grad` put back as it was before (the parameters
    do not change inside a `training_step`).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    accumulated = gradient.take_grads(trainable)  # A, put back as is if the step is refused
    own = trainer.__dict__.get("compute_loss")
    compute_loss = trainer.compute_loss
    calls = 0

    def with_penalty(loss_model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        result = compute_loss(loss_model, *args, **kwargs)
        loss, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, None)
        trainable = [p for p in loss_model.parameters() if p.requires_grad]
        loss = gradient.exact_gr_loss(loss, trainable, gr_lambda)
        return loss if rest is None else (loss, *rest)

    trainer.compute_loss = with_penalty  # type: ignore[method-assign]
    try:
        loss = parent(model, inputs, num_items_in_batch)
        if calls == 0:
            raise RuntimeError(_NO_COMPUTE_LOSS.format(type(trainer).__name__))
    except BaseException:
        gradient.put_back_(trainable, accumulated)
        raise
    finally:
        if own is None:
            del trainer.compute_loss
        else:
            trainer.compute_loss = own  # type: ignore[method-assign]
    gradient.accumulate_(trainable, accumulated)  # A + this micro-batch's gradient, as backward would have formed
    return loss


_NO_COMPUTE_LOSS = (
    "gr_method='exact' adds λ·‖∇L‖ to the loss that `compute_loss` returns, but the training_step {} inherits never "
    "called it: use gr_method='finite_difference'."
)


@contextlib.contextmanager
def _uncounted_pass(trainer: Any) -> Iterator[None]:
    """What the parent records per `compute_loss` call (TRL's `_metrics`, token counts) during this pass is
    dropped, so that each micro-batch counts once."""
    metrics = getattr(trainer, "_metrics", None)  # TRL's per-mode metrics, where the trainer keeps them
    saved_metrics = None
    if isinstance(metrics, dict):
        saved_metrics = {mode: {k: list(v) for k, v in values.items()} for mode, values in metrics.items()
                         if isinstance(values, dict)}  # fmt: skip
    tokens = getattr(trainer, "_total_train_tokens", None)
    try:
        yield
    finally:
        if saved_metrics is not None:
            for mode, values in saved_metrics.items():
                metrics[mode].clear()
                metrics[mode].update(values)
        if tokens is not None:
            trainer._total_train_tokens = tokens  # the Trainer's own count


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
    written = next((b for b in cls.__bases__ if issubclass(b, Trainer) and not issubclass(b, GRMixin)), owner)
    through = "" if written is owner else f" (through {owner.__name__})"
    ordered = sorted(cls.__bases__, key=lambda b: not issubclass(b, GRMixin))  # stable: the GR base(s) first
    verb = "is" if len(bypassed) == 1 else "are"
    raise TypeError(
        f"{cls.__name__} puts {written.__name__} before GRMixin in its bases, so its "
        f"{', '.join(bypassed)}{through} {verb} reached before GR's and the model may train without GR: put GR "
        f"first, `class {cls.__name__}({', '.join(b.__name__ for b in ordered)})`."
    )


def _first_definer(mro: tuple[type, ...], name: str) -> type | None:
    return next((c for c in mro if name in vars(c)), None)


class GRTrainer(GRMixin, Trainer):
    """A `Trainer` that trains with gradient regularization (GR) or SAM, configured by `GRTrainingArguments`.

    See `GRMixin` for the step and the logged metrics.
    """

    def __init__(self, model: nn.Module | None = None, args: GRArguments | None = None, *trainer_args: Any,
                 **trainer_kwargs: Any) -> None:  # fmt: skip
        """
        Args:
            model (`PreTrainedModel` or `nn.Module`, *optional*): the model to train, as for `Trainer`.
            args (`GRTrainingArguments`, *optional*): the training and GR settings (default: `GRTrainingArguments`
                with `output_dir="tmp_trainer"`, as `Trainer` does).
            *trainer_args: the other positional arguments of `transformers.Trainer` (`data_collator`, ...).
            **trainer_kwargs: every other argument of `transformers.Trainer`, unchanged (`train_dataset`,
                `eval_dataset`, `processing_class`, `compute_metrics`, `callbacks`, `optimizers`, ...).
        """
        if args is None:
            args = GRTrainingArguments(output_dir="tmp_trainer")  # as Trainer does without arguments
        super().__init__(model, args, *trainer_args, **trainer_kwargs)


class _GRStepCallback(TrainerCallback):
    """Hands the Trainer's step events to the mixin's own bookkeeping (given as bound methods)."""

    def __init__(self, begin_training: Any, start_step: Any, end_step: Any, save_state: Any) -> None:
        self.begin_training, self.start_step, self.end_step, self.save_state = (
            begin_training, start_step, end_step, save_state
        )

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.begin_training(state)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start_step()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.end_step()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.save_state(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


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


def _gr_state_name(process_index: int, world_size: int) -> str:
    return GR_STATE_NAME if world_size <= 1 else f"gr_state_{process_index}.pt"

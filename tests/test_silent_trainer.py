"""Ways the Trainer side of GR could quietly not happen, or quietly be misreported, each now correct or refused:
the mixin in the wrong base position, an arguments class without `@dataclass`, `gr_method="exact"` with a user's
own `compute_loss`, α far past the paper's range, the distributed mode at train start, and a resume with changed
GR settings (warned, and recorded with step ranges in the checkpoint and the model card)."""

import json
import logging
import warnings
from dataclasses import dataclass

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import Seq2SeqTrainer, Trainer, TrainingArguments

from hf_gr import GRArguments, GRMixin, GRTrainer, GRTrainingArguments
from hf_gr._internal import setup

from gr_testing import DictDataset, TinyNet, exact_gr_grad, grads_of, make_args, max_rel_err, params_of

# ---- the mixin's place among the bases ----


class UsersTrainer(Trainer):
    """A user's Trainer subclass with its own loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(x=inputs["x"])
        loss = margin_loss(outputs["logits"], inputs["labels"])
        return (loss, outputs) if return_outputs else loss


@pytest.mark.parametrize(
    "bases, fix",
    [((Trainer, GRMixin), "class Wrong(GRMixin, Trainer)"),
     ((UsersTrainer, GRMixin), "class Wrong(GRMixin, UsersTrainer)"),
     ((Seq2SeqTrainer, GRTrainer), "class Wrong(GRTrainer, Seq2SeqTrainer)")],
    ids=["trainer-first", "users-trainer-first", "seq2seq-before-grtrainer"],
)  # fmt: skip
def test_a_trainer_before_the_mixin_is_refused_when_the_class_is_defined(bases, fix):
    # Before the check, `class Wrong(Trainer, GRMixin)` was accepted and trained plain: Trainer.__init__ does not
    # call super(), so GRMixin.__init__ never ran, and Trainer's training_step, log and train were reached first.
    with pytest.raises(TypeError, match="before GRMixin") as error:
        type("Wrong", bases, {})
    assert fix in str(error.value)


def test_orders_that_reach_gr_first_are_accepted(tmp_path):
    class Right(GRMixin, UsersTrainer):
        pass

    class Further(GRTrainer):  # a user's own compute_loss on top of GRTrainer: GR's methods still come first
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return margin_loss(model(x=inputs["x"])["logits"], inputs["labels"])

    class Deeper(Right):
        pass

    for cls in (Right, Further, Deeper):
        assert isinstance(cls(model=TinyNet(), args=make_args(tmp_path)).gr_passes.model, TinyNet)


def test_arguments_combined_without_dataclass_say_add_dataclass(tmp_path):
    class GRFirst(GRArguments, TrainingArguments):
        pass

    class TrainingFirst(TrainingArguments, GRArguments):  # was accepted, with the GR flags silently at defaults
        pass

    for cls in (GRFirst, TrainingFirst):
        with pytest.raises(TypeError, match=rf"add @dataclass above `class {cls.__name__}"):
            cls(output_dir=str(tmp_path), use_cpu=True)

    class Subclass(GRTrainingArguments):  # inherits a complete __init__: fine without @dataclass
        pass

    @dataclass
    class Reversed(TrainingArguments, GRArguments):
        pass

    assert Subclass(output_dir=str(tmp_path), gr_lambda=0.05).gr_alpha == pytest.approx(0.5)
    assert Reversed(output_dir=str(tmp_path), gr_lambda=0.05).gr_alpha == pytest.approx(0.5)


# ---- gr_method="exact" with a user's own compute_loss ----


def margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Squared distance of the true class's probability from 1: not the model's own loss."""
    return (logits.softmax(-1).gather(1, labels[:, None]) - 1).pow(2).mean()


class OwnLossGRTrainer(GRTrainer):
    """A user's GRTrainer subclass whose compute_loss does not call super()."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(x=inputs["x"])
        loss = margin_loss(outputs["logits"], inputs["labels"])
        return (loss, outputs) if return_outputs else loss


def test_exact_method_penalizes_a_users_own_compute_loss(tmp_path):
    batch = DictDataset(16).batch(0, 16)
    model = TinyNet()
    trainer = OwnLossGRTrainer(model=model, args=make_args(tmp_path, gr_method="exact", gr_lambda=0.5, gr_r=1.0))
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(model, dict(batch))
    got = grads_of(model)
    assert "compute_loss" not in vars(trainer)  # the wrapper is gone after the step

    margin = lambda out, b: margin_loss(out["logits"], b["labels"])  # noqa: E731
    want = exact_gr_grad(TinyNet(), batch, 0.5, loss_fn=margin)  # ∇L + λ·H∇L/‖∇L‖ by a Hessian-vector product
    plain_model = TinyNet()
    margin(plain_model(x=batch["x"]), batch).backward()
    plain = grads_of(plain_model)
    assert max_rel_err(got, want) < 1e-5
    assert max_rel_err(plain, want) > 1e-2  # the penalty matters here: a plain step would fail the line above


class NoComputeLoss(Trainer):
    """A parent whose training_step computes its loss without `compute_loss`."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = model(**inputs)["loss"]
        self.accelerator.backward(loss)
        return loss.detach()


def test_exact_method_refuses_a_step_that_never_calls_compute_loss(tmp_path):
    class GRNoComputeLoss(GRMixin, NoComputeLoss):
        pass

    model = TinyNet()
    trainer = GRNoComputeLoss(model=model, args=make_args(tmp_path, gr_method="exact"))
    trainer.current_gradient_accumulation_steps = 1
    with pytest.raises(RuntimeError, match="gr_method='finite_difference'"):
        trainer.training_step(model, DictDataset(8).batch(0, 8))



def test_a_refused_exact_step_leaves_parameters_and_gradients_as_they_were(tmp_path):
    """The refusal comes after the parent's step ran (only then is it known that it never called compute_loss):
    the gradient an earlier micro-batch accumulated is put back as it was, and θ did not move."""

    class GRNoComputeLoss(GRMixin, NoComputeLoss):
        pass

    model = TinyNet()
    trainer = GRNoComputeLoss(model=model, args=make_args(tmp_path, gr_method="exact"))
    trainer.current_gradient_accumulation_steps = 1
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)  # A, from an earlier micro-batch of the step
    before, grads = params_of(model), [p.grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="never called it"):
        trainer.training_step(model, DictDataset(8).batch(0, 8))
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))
    assert all(p.grad is g and bool((g == 0.5).all()) for p, g in zip(model.parameters(), grads))


def test_an_exact_step_adds_to_what_earlier_micro_batches_accumulated(tmp_path):
    batch = DictDataset(16).batch(0, 16)
    model = TinyNet()
    trainer = OwnLossGRTrainer(model=model, args=make_args(tmp_path, gr_method="exact", gr_lambda=0.5, gr_r=1.0))
    trainer.current_gradient_accumulation_steps = 1
    accumulated = [torch.full_like(p, 0.25) for p in model.parameters()]
    for p, a in zip(model.parameters(), accumulated):
        p.grad = a.clone()
    trainer.training_step(model, dict(batch))
    margin = lambda out, b: margin_loss(out["logits"], b["labels"])  # noqa: E731
    want = [a + g for a, g in zip(accumulated, exact_gr_grad(TinyNet(), batch, 0.5, loss_fn=margin))]
    assert max_rel_err(grads_of(model), want) < 1e-5

# ---- α far from the paper's range ----


@pytest.mark.parametrize("gr_lambda, warns", [(0.5, True), (0.2, False), (0.1, False)])
def test_alpha_above_two_warns_once(tmp_path, gr_lambda, warns):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = make_args(tmp_path, gr_lambda=gr_lambda, gr_r=0.1)
        GRTrainer(model=TinyNet(), args=args)
    messages = [str(w.message) for w in caught if "extrapolates" in str(w.message)]
    assert len(messages) == (1 if warns else 0)
    if warns:
        assert "α = 5 > 2" in messages[0] and "1 − α = -4 < −1" in messages[0] and "past g2" in messages[0]


def test_alpha_set_above_two_after_the_arguments_were_built_warns_when_the_trainer_takes_them(tmp_path):
    args = make_args(tmp_path, gr_lambda=0.1, gr_r=0.1)
    args.gr_lambda = 0.3  # α = 3, set after the arguments validated themselves
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GRTrainer(model=TinyNet(), args=args)
        GRTrainer(model=TinyNet(), args=args)  # the same α again: said once
    messages = [str(w.message) for w in caught if "extrapolates" in str(w.message)]
    assert len(messages) == 1 and "α = 3 > 2" in messages[0]


# ---- the distributed mode at train start ----


def test_train_start_says_how_gr_runs(tmp_path, caplog):
    trainer = GRTrainer(model=TinyNet(), args=make_args(tmp_path, max_steps=1), train_dataset=DictDataset(16))
    with caplog.at_level(logging.INFO, logger="hf_gr.trainer"):
        trainer.train()
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("GR: ")] == ["GR: single process."]


def test_fsdp_asked_for_but_not_running_warns(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    with caplog.at_level(logging.WARNING, logger="hf_gr.trainer"):
        trainer = GRTrainer(model=TinyNet(), args=make_args(tmp_path))
    assert not trainer.is_fsdp_enabled  # accelerate falls back on CPU
    assert "FSDP was asked for (the accelerate config) but the run is single process" in caplog.text


# ---- resuming with changed settings ----


def _run(tmp_path, steps, **overrides):
    args = make_args(tmp_path, max_steps=steps, save_strategy="steps", save_steps=4, logging_steps=1,
                     lr_scheduler_type="constant", **overrides)  # fmt: skip
    return GRTrainer(model=TinyNet(), args=args, train_dataset=DictDataset(64))


def _segments(folder):
    with open(folder / "trainer_state.json", encoding="utf-8") as f:
        return json.load(f)["stateful_callbacks"]["GRSettingsRecord"]["args"]["segments"]


@pytest.mark.parametrize("restore_callbacks", [False, True])  # True: transformers rebuilds the record from the state
def test_resume_with_changed_settings_warns_and_records_each_range(tmp_path, caplog, restore_callbacks):
    _run(tmp_path, 4, gr_lambda=0.1).train()  # steps 1–4 at λ = 0.1, saved in checkpoint-4
    resumed = _run(tmp_path, 6, gr_lambda=0.05, gr_warmup_strategy="zero", gr_warmup_steps=1,
                   restore_callback_states_from_checkpoint=restore_callbacks)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="hf_gr.trainer"):
        resumed.train(resume_from_checkpoint=True)  # steps 5–6 at λ = 0.05
    warnings = [r.getMessage() for r in caplog.records if "changed GR settings" in r.getMessage()]
    assert len(warnings) == 1
    warning = warnings[0]
    assert "Resuming at step 4" in warning
    assert "gr_lambda: 0.1 → 0.05" in warning and "gr_warmup_strategy: 'none' → 'zero'" in warning
    assert "gr_warmup_steps: 0 → 1" in warning and "gr_r" not in warning

    first, second = _segments(tmp_path / "out" / "checkpoint-6")
    assert (first["first_step"], first["last_step"], first["gr_lambda"]) == (1, 4, 0.1)
    assert (second["first_step"], second["last_step"], second["gr_lambda"]) == (5, 6, 0.05)
    assert (first["gr_warmup_strategy"], second["gr_warmup_strategy"]) == ("none", "zero")
    logged = [e["gr_lambda"] for e in resumed.state.log_history if "loss" in e]
    assert logged == [0.1] * 4 + [0.05] * 2  # the record matches what each step applied

    resumed.create_model_card()
    card = ModelCard.load(tmp_path / "out" / "README.md")
    ranges = [(s["first_step"], s["last_step"], s["gr_lambda"]) for s in card.data.hf_gr["gr_segments"]]
    assert ranges == [(1, 4, 0.1), (5, 6, 0.05)]
    assert "  - steps 1–4: λ = 0.1, r = 0.1 (α = 1)" in card.text and "GR warmup: none over W = 0" in card.text
    assert "  - steps 5–6: λ = 0.05, r = 0.1 (α = 0.5)" in card.text and "GR warmup: zero over W = 1" in card.text
    assert "\n- λ = " not in card.text  # no line claims one λ for the whole run


def test_a_resume_that_changes_only_the_ascent_fraction_shows_two_different_ranges(tmp_path):
    _run(tmp_path, 4).train()
    resumed = _run(tmp_path, 6, gr_ascent_fraction=0.5, per_device_train_batch_size=8)
    resumed.train(resume_from_checkpoint=True)
    resumed.create_model_card()
    card = ModelCard.load(tmp_path / "out" / "README.md")
    first, second = card.data.hf_gr["gr_segments"]
    assert list(first) == list(second)  # one key order, the checkpoint's sorted JSON notwithstanding
    lines = [line for line in card.text.splitlines() if line.startswith("  - steps ")]
    assert len(lines) == 2 and "ascent fraction f = 1.0" in lines[0] and "ascent fraction f = 0.5" in lines[1]


def test_resume_with_the_same_settings_keeps_one_range(tmp_path, caplog):
    _run(tmp_path, 4).train()
    resumed = _run(tmp_path, 6)
    with caplog.at_level(logging.WARNING, logger="hf_gr.trainer"):
        resumed.train(resume_from_checkpoint=True)
    assert "changed GR settings" not in caplog.text
    (only,) = _segments(tmp_path / "out" / "checkpoint-6")
    assert (only["first_step"], only["last_step"], only["gr_lambda"]) == (1, 6, 0.1)
    resumed.create_model_card()
    text = (tmp_path / "out" / "README.md").read_text()
    assert "steps 1–" not in text and "\n- λ = 0.1, r = 0.1 (α = λ/r = 1)" in text  # one range: the plain section


def test_resume_from_a_checkpoint_without_a_record_says_what_is_recorded(tmp_path, caplog):
    _run(tmp_path, 4).train()
    state_file = tmp_path / "out" / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["GRSettingsRecord"]  # as a checkpoint written before the record existed
    state_file.write_text(json.dumps(state))
    resumed = _run(tmp_path, 6)
    with caplog.at_level(logging.WARNING, logger="hf_gr.trainer"):
        resumed.train(resume_from_checkpoint=True)
    assert "checkpoint at step 4 holds no record of the GR settings" in caplog.text
    (only,) = _segments(tmp_path / "out" / "checkpoint-6")
    assert (only["first_step"], only["last_step"]) == (5, 6)
    resumed.create_model_card()
    assert "  - steps 5–6: λ = 0.1" in (tmp_path / "out" / "README.md").read_text()


# ---- a launcher's several processes that each run alone ----


def test_a_lone_process_of_several_is_refused(tmp_path, monkeypatch):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs: WORLD_SIZE=2 in each process,
    but no process group; each would train alone into the same folder."""
    trainer = GRTrainer(model=TinyNet(), args=make_args(tmp_path))
    setup.refuse_unsupported(trainer)  # one process, no launcher: fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2 .* single process.*torchrun --nproc_per_node 2"):
        setup.refuse_unsupported(trainer)

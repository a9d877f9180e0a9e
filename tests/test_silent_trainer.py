"""Ways the Trainer side of GR could quietly not happen, or quietly be misreported, each now correct or refused:
the mixin in the wrong base position, an arguments class without `@dataclass`, `gr_method="exact"` with a user's
own `compute_loss`, α far past the paper's range, the distributed mode at train start, and a resume with changed
GR settings (warned, and recorded with step ranges in the checkpoint and the model card)."""

import warnings
from dataclasses import dataclass

import pytest
import torch
from transformers import Seq2SeqTrainer, Trainer, TrainingArguments

from hf_gr import GRArguments, GRMixin, GRTrainer, GRTrainingArguments

from gr_testing import DictDataset, TinyNet, exact_gr_grad, grads_of, make_args, max_rel_err

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
        assert isinstance(cls(model=TinyNet(), args=make_args(tmp_path)).gr_regularizer.model, TinyNet)


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

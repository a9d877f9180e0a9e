"""GRTrainer.training_step against independent computations of the GR gradient."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer

from hf_gr import GRTrainer
from hf_gr._internal import gradient

from gr_testing import (
    DictDataset,
    SequentialGRTrainer,
    StepUpdates,
    TinyNet,
    exact_gr_grad,
    grad_at,
    grads_of,
    make_args,
    max_rel_err,
    params_of,
    reference_gr_grad,
    step_trainer,
)


@pytest.mark.filterwarnings("ignore:gr_lambda/gr_r = α")  # α = 2.5 on purpose
@pytest.mark.parametrize("gr_lambda", [0.05, 0.1, 0.25])  # α = 0.5, 1 (SAM), 2.5
def test_two_pass_gradient_matches_reference(tmp_path, gr_lambda):
    model = TinyNet(dropout=0.3)
    batch = DictDataset(16).batch(0, 16)
    trainer = step_trainer(tmp_path, model, gr_lambda=gr_lambda, gr_r=0.1)
    torch.manual_seed(123)
    trainer.training_step(model, dict(batch))
    want = reference_gr_grad(model, batch, gr_lambda, 0.1, seed=123)
    assert max_rel_err(grads_of(model), want) < 1e-6


def test_finite_difference_approaches_exact_gradient_linearly_in_r(tmp_path):
    model = TinyNet().double()
    data = DictDataset(32, dtype=torch.float64)
    batch = data.batch(0, 32)
    gr_lambda = 0.05
    exact = exact_gr_grad(model, batch, gr_lambda)
    errors = []
    for r in (1e-1, 1e-2, 1e-3):
        model.zero_grad()
        step_trainer(tmp_path, model, gr_lambda=gr_lambda, gr_r=r).training_step(model, dict(batch))
        errors.append(max_rel_err(grads_of(model), exact))
    for bigger, smaller in zip(errors, errors[1:]):
        assert 5 < bigger / smaller < 20, errors  # O(r): ten times smaller r, about ten times smaller error
    # The trainer's exact mode (double backprop) is the same oracle.
    model.zero_grad()
    step_trainer(tmp_path, model, gr_lambda=gr_lambda, gr_method="exact").training_step(model, dict(batch))
    assert max_rel_err(grads_of(model), exact) < 1e-10


def test_gradient_accumulation_is_mean_of_micro_batch_gr_gradients(tmp_path):
    model = TinyNet()
    data = DictDataset(32)
    trainer = step_trainer(tmp_path, model, gr_lambda=0.05, gr_r=0.1, gradient_accumulation_steps=4)
    for i in range(4):
        trainer.training_step(model, data.batch(8 * i, 8))
    per_batch = [reference_gr_grad(model, data.batch(8 * i, 8), 0.05, 0.1) for i in range(4)]
    want = [sum(gs) / 4 for gs in zip(*per_batch)]
    assert max_rel_err(grads_of(model), want) < 1e-6


def test_one_sgd_step_moves_parameters_by_lr_times_gr_gradient(tmp_path):
    model, data = TinyNet(), DictDataset(16)
    before = params_of(model)
    want = reference_gr_grad(model, data.batch(0, 16), 0.1, 0.1)
    args = make_args(
        tmp_path,
        per_device_train_batch_size=16,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        gr_lambda=0.1,
        gr_r=0.1,
    )
    SequentialGRTrainer(model=model, args=args, train_dataset=data).train()
    moved = [(b - a) / 0.5 for a, b in zip(params_of(model), before)]
    assert max_rel_err(moved, want) < 1e-5


def test_lambda_zero_is_the_stock_trainer_bit_for_bit(tmp_path):
    common = dict(max_steps=6, learning_rate=1e-2, warmup_steps=2, gr_lambda=0.0)
    models = []
    for cls in (Trainer, GRTrainer):
        model = TinyNet(dropout=0.2)
        args = make_args(tmp_path, **common)
        cls(model=model, args=args, train_dataset=DictDataset(64)).train()
        models.append(model)
    assert all(torch.equal(a, b) for a, b in zip(params_of(models[0]), params_of(models[1])))
    assert models[1].forward_calls == 6  # one pass per step


def test_parameters_restored_bit_exactly(tmp_path):
    model = TinyNet(dropout=0.2)
    before = params_of(model)
    step_trainer(tmp_path, model).training_step(model, DictDataset(8).batch(0, 8))
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))
    assert model.forward_calls == 2


def test_parameters_restored_when_pass_two_raises(tmp_path):
    calls = {"n": 0}

    def loss_raising_on_second_pass(outputs, labels, num_items_in_batch=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom in pass 2")
        return F.cross_entropy(outputs["logits"], labels)

    model = TinyNet()
    before = params_of(model)
    trainer = GRTrainer(model=model, args=make_args(tmp_path), compute_loss_func=loss_raising_on_second_pass)
    trainer.current_gradient_accumulation_steps = 1
    with pytest.raises(RuntimeError, match="boom in pass 2"):
        trainer.training_step(model, DictDataset(8).batch(0, 8))
    assert calls["n"] == 2
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))


def test_both_passes_see_the_same_dropout_mask(tmp_path, monkeypatch):
    model = TinyNet(dropout=0.5)
    batch = DictDataset(16).batch(0, 16)
    # With no perturbation (θ + ε replaced by θ), pass 2 must reproduce pass 1: g1 + α·(g2 − g1) = g1 exactly.
    monkeypatch.setattr(gradient, "perturb_", lambda params, grads, r, divisor: None)
    trainer = step_trainer(tmp_path, model, gr_lambda=0.05, gr_r=0.1)
    torch.manual_seed(7)
    trainer.training_step(model, dict(batch))
    gr_grads = grads_of(model)
    model.zero_grad()
    torch.manual_seed(7)
    Trainer.training_step(trainer, model, dict(batch))
    assert all(torch.equal(a, b) for a, b in zip(gr_grads, grads_of(model)))
    model.zero_grad()
    torch.manual_seed(8)  # another mask gives another gradient: the comparison above can fail
    Trainer.training_step(trainer, model, dict(batch))
    assert not all(torch.equal(a, b) for a, b in zip(gr_grads, grads_of(model)))


def test_label_smoothing_with_gr(tmp_path):
    model = TinyNet()
    batch = DictDataset(16).batch(0, 16)
    step_trainer(tmp_path, model, label_smoothing_factor=0.1).training_step(model, dict(batch))

    def smoothed(out, b):
        return F.cross_entropy(out["logits"], b["labels"], label_smoothing=0.1)

    assert max_rel_err(grads_of(model), reference_gr_grad(model, batch, 0.1, 0.1, loss_fn=smoothed)) < 1e-5


def test_compute_loss_func_with_gr(tmp_path):
    def squared_margin(outputs, labels, num_items_in_batch=None):
        return (outputs["logits"].softmax(-1).gather(1, labels[:, None]) - 1).pow(2).mean()

    model = TinyNet()
    batch = DictDataset(16).batch(0, 16)
    trainer = GRTrainer(model=model, args=make_args(tmp_path), compute_loss_func=squared_margin)
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(model, dict(batch))
    want = reference_gr_grad(model, batch, 0.1, 0.1, loss_fn=lambda out, b: squared_margin(out, b["labels"]))
    assert max_rel_err(grads_of(model), want) < 1e-5


def test_frozen_parameters_are_left_alone(tmp_path):
    model = TinyNet()
    model.fc1.weight.requires_grad_(False)
    before = model.fc1.weight.detach().clone()
    batch = DictDataset(16).batch(0, 16)
    step_trainer(tmp_path, model).training_step(model, dict(batch))
    assert model.fc1.weight.grad is None and torch.equal(model.fc1.weight, before)
    assert max_rel_err(grads_of(model), reference_gr_grad(model, batch, 0.1, 0.1)) < 1e-6


def _zero_loss(outputs, labels, num_items_in_batch=None):
    return 0 * outputs["logits"].sum()


def _infinite_loss(outputs, labels, num_items_in_batch=None):
    return outputs["logits"].sum() * float("inf")


def test_zero_gradient_gives_a_plain_step(tmp_path):
    model = TinyNet()
    before = params_of(model)
    trainer = GRTrainer(model=model, args=make_args(tmp_path, gr_lambda=0.05), compute_loss_func=_zero_loss)
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(model, DictDataset(8).batch(0, 8))
    assert model.forward_calls == 2  # decided on the device: pass 2 runs, at θ (no direction, no perturbation)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads_of(model))  # g1 = g2 = 0, no NaN from 0/0
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))


def test_non_finite_first_pass_leaves_a_non_finite_gradient(tmp_path):
    model = TinyNet()
    before = params_of(model)
    trainer = GRTrainer(model=model, args=make_args(tmp_path), compute_loss_func=_infinite_loss)
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(model, DictDataset(8).batch(0, 8))
    assert any(not torch.isfinite(g).all() for g in grads_of(model))  # left for the fp16 scaler to skip the step
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))


class _PixelsAsX(torch.nn.Module):
    """A ViT called as the reference helpers call models: `model(x=pixels)` → {"logits"}."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return {"logits": self.vit(pixel_values=x).logits}


def test_bf16_autocast_vit_steps_apply_the_gr_gradient(tmp_path):
    """Each bf16-autocast step of a tiny ViT applies the GR gradient of a float64 reference (no autocast, from the
    parameters the step started from) within bf16's precision, and the plain gradient is far outside it (α = 2)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (48,), generator=g)
    pixels = torch.randn(48, 1, 8, 8, generator=g) * 0.3 + (2.0 * labels[:, None, None, None] - 1.0)
    data = [{"pixel_values": p, "labels": y} for p, y in zip(pixels, labels)]
    args = make_args(
        tmp_path, bf16=True, max_steps=3, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
        max_grad_norm=0.0, per_device_train_batch_size=16, gr_lambda=2.0, gr_r=1.0,
    )  # fmt: skip
    updates = StepUpdates()
    trainer = SequentialGRTrainer(model=model, args=args, train_dataset=data, callbacks=[updates])
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    assert len(updates.before) == 3
    tolerance = 3e-2  # measured: at most 1e-2
    for t, (before, applied) in enumerate(zip(updates.before, updates.applied(1.0))):
        reference = _PixelsAsX(ViTForImageClassification(config)).double()
        with torch.no_grad():
            for p, value in zip(reference.parameters(), before):
                p.copy_(value)
        batch = {"x": pixels[16 * t : 16 * t + 16].double(), "labels": labels[16 * t : 16 * t + 16]}
        want = reference_gr_grad(reference, batch, 2.0, 1.0)
        plain = grad_at(reference, dict(reference.named_parameters()), batch)
        assert max_rel_err(plain, want) > 10 * tolerance  # the comparison below can fail
        assert max_rel_err(applied, want) < tolerance, t


class _OwnLossTrainer(GRTrainer):
    """A user's `compute_loss` that does not call `super()`: GR must still weight pass 2 by α."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(x=inputs["x"])
        loss = F.cross_entropy(outputs["logits"], inputs["labels"])
        return (loss, outputs) if return_outputs else loss


@pytest.mark.parametrize("gr_lambda", [0.05, 0.25])
def test_subclass_with_its_own_compute_loss(tmp_path, gr_lambda):
    model = TinyNet()
    batch = DictDataset(16).batch(0, 16)
    trainer = _OwnLossTrainer(model=model, args=make_args(tmp_path, gr_lambda=gr_lambda))
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(model, dict(batch))
    assert max_rel_err(grads_of(model), reference_gr_grad(model, batch, gr_lambda, 0.1)) < 1e-6


class _BatchNormNet(TinyNet):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(16)

    def forward(self, x, labels=None):
        logits = self.fc2(self.norm(torch.tanh(self.fc1(x))))
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)}


def test_batchnorm_statistics_updated_once(tmp_path):
    model = _BatchNormNet()
    batch = DictDataset(16).batch(0, 16)
    reference = _BatchNormNet()
    reference.load_state_dict(model.state_dict())
    reference.train()
    reference(**batch)  # one forward at θ: what pass 1 does to the running statistics
    step_trainer(tmp_path, model).training_step(model, dict(batch))
    assert torch.equal(model.norm.running_mean, reference.norm.running_mean)
    assert torch.equal(model.norm.running_var, reference.norm.running_var)
    assert int(model.norm.num_batches_tracked) == 1


def test_fp16_loss_scaling(tmp_path):
    """A loss-scaled g1 gives the same ε (the scale cancels); `.grad` holds the scaled GR gradient."""
    model = TinyNet()
    batch = DictDataset(16).batch(0, 16)
    trainer = step_trainer(tmp_path, model, gr_lambda=0.05)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer.training_step(model, dict(batch))
    scaled = [g / 1024.0 for g in grads_of(model)]
    assert max_rel_err(scaled, reference_gr_grad(model, batch, 0.05, 0.1)) < 1e-6


def test_fp16_scaler_skips_a_step_with_a_non_finite_gradient(tmp_path):
    model = TinyNet()
    before = params_of(model)
    trainer = GRTrainer(model=model, args=make_args(tmp_path, optim="sgd"), compute_loss_func=_infinite_loss)
    trainer.current_gradient_accumulation_steps = 1
    trainer.create_optimizer()
    scaler = trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer.training_step(model, DictDataset(8).batch(0, 8))
    scaler.step(trainer.optimizer)  # what the Trainer's optimizer step does under fp16
    scaler.update()
    assert scaler.get_scale() == 512.0  # skipped, scale backed off
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))


@pytest.mark.parametrize("optim", ["lomo", "galore_adamw_layerwise"])
def test_optimizers_that_step_inside_backward_are_refused(tmp_path, optim):
    with pytest.raises(ValueError, match=optim):
        GRTrainer(model=TinyNet(), args=make_args(tmp_path, optim=optim))


def test_parameters_without_a_gradient_are_skipped(tmp_path):
    model = TinyNet()
    model.unused = torch.nn.Parameter(torch.ones(4))  # trainable, but never in the graph
    batch = DictDataset(16).batch(0, 16)
    step_trainer(tmp_path, model).training_step(model, dict(batch))
    assert model.unused.grad is None and torch.equal(model.unused, torch.ones(4))
    got = [p.grad for n, p in model.named_parameters() if n != "unused"]
    same_weights = TinyNet()  # seed 0, as `model` before the step
    assert max_rel_err(got, reference_gr_grad(same_weights, batch, 0.1, 0.1)) < 1e-6

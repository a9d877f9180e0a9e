"""Defects found by review and first use, each with the behaviour it must have (each failed before its fix)."""

import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback, get_linear_schedule_with_warmup

from hf_gr import GRTrainer
from hf_gr._internal import gradient

from gpu_check_lib import attach_cpu_scaler
from gr_testing import (
    DictDataset,
    SequentialGRTrainer,
    StepUpdates,
    TinyNet,
    grad_at,
    grads_of,
    make_args,
    max_rel_err,
    params_of,
    reference_gr_grad,
    step_trainer,
)

# ---- λ and r are read at every step ----


def test_changing_gr_lambda_after_construction_takes_effect(tmp_path):
    """`hyperparameter_search` sets trial values on `trainer.args` after __init__: every step applies the new λ."""
    model, data, updates = TinyNet(), DictDataset(64), StepUpdates()
    args = make_args(tmp_path, max_steps=3, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
                     max_grad_norm=0.0, gr_lambda=0.05)  # fmt: skip
    trainer = SequentialGRTrainer(model=model, args=args, train_dataset=data, callbacks=[updates])
    trainer.args.gr_lambda = 0.0  # plain steps, one pass each
    trainer.train()
    assert model.forward_calls == 3
    trainer.args.gr_lambda, trainer.args.max_steps = 0.25, 2  # α = 2.5, not the 0.5 it was built with
    trainer.train()
    assert model.forward_calls == 3 + 2 * 2
    assert len(updates.before) == 5
    for t, (before, applied) in enumerate(zip(updates.before, updates.applied(1.0))):
        reference = TinyNet()
        with torch.no_grad():
            for p, value in zip(reference.parameters(), before):
                p.copy_(value)
        batch = data.batch(8 * (t if t < 3 else t - 3), 8)  # each `train()` reads the data from the start
        if t < 3:
            want = grad_at(reference, dict(reference.named_parameters()), batch)
        else:
            want = reference_gr_grad(reference, batch, 0.25, 0.1)
        assert max_rel_err(applied, want) < 1e-5, t


# ---- a raise in pass 2 loses nothing ----


class _RaiseInSecondPass(Exception):
    pass


@pytest.mark.parametrize("where", ["pass 1", "forward", "backward"])
def test_raise_in_a_pass_keeps_the_accumulated_gradient_exactly(tmp_path, where):
    model = TinyNet()
    data = DictDataset(32)
    trainer = step_trainer(tmp_path, model, gr_lambda=0.05, gradient_accumulation_steps=2)
    trainer.training_step(model, data.batch(0, 8))  # micro-batch 1 accumulates A
    accumulated = grads_of(model)
    before = params_of(model)
    calls = {"forward": 0, "hook": 0}

    def raise_on_forward(module, args):
        calls["forward"] += 1
        if calls["forward"] == (1 if where == "pass 1" else 2):
            raise _RaiseInSecondPass

    def raise_on_second_backward(grad):
        calls["hook"] += 1
        if calls["hook"] == 2:  # fc2's gradient has been combined into `.grad` by now; fc1's has not
            raise _RaiseInSecondPass
        return grad

    if where in ("pass 1", "forward"):
        handle = model.register_forward_pre_hook(raise_on_forward)
    else:
        handle = model.fc1.weight.register_hook(raise_on_second_backward)
    with pytest.raises(_RaiseInSecondPass):
        trainer.training_step(model, data.batch(8, 8))
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(grads_of(model), accumulated))  # bit for bit, also fc2's
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))
    # the loop can go on: the next micro-batch adds its GR gradient to A
    trainer.training_step(model, data.batch(16, 8))
    want = [a + b / 2 for a, b in zip(accumulated, reference_gr_grad(model, data.batch(16, 8), 0.05, 0.1))]
    assert max_rel_err(grads_of(model), want) < 1e-6


# ---- half-precision weights at any α ----


class _HalfQuadratic(torch.nn.Module):
    """L(θ) = ⟨x̄, θ⟩ + ½·Σ h_i·θ_i², evaluated in float32 from half-precision θ = (w, b), at θ = 0.

    Its GR gradient has a closed form: g1 = x̄, g2 = x̄ + r·h⊙x̄/‖x̄‖, g = x̄ + α·r·h⊙x̄/‖x̄‖.
    """

    def __init__(self, curvature: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4, 4, dtype=dtype))
        self.b = torch.nn.Parameter(torch.zeros(16, dtype=dtype))
        self.register_buffer("curvature", curvature)
        from transformers import PretrainedConfig

        self.config = PretrainedConfig()

    def forward(self, x, labels=None):
        theta = torch.cat([self.w.flatten(), self.b]).float()
        return {"loss": (x * theta).sum(-1).mean() + 0.5 * (self.curvature * theta**2).sum()}


@pytest.mark.filterwarnings("ignore:gr_lambda/gr_r = α")  # α = 2.5 on purpose
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha", [1e-8, 1e-5, 1e-2, 0.5, 1.0, 2.5])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_half_precision_weights_at_any_alpha_match_a_float64_reference(tmp_path, dtype, alpha, accumulation):
    """At every α the GR term α·(g2 − g1) is about as large as g1 (g2 − g1 ≈ g1/α): it is resolvable in half
    precision, so a plain gradient (or any other α) misses by its whole size. g2 reaches ~2e4, near fp16's range."""
    r, n = 0.1, 32
    g = torch.Generator().manual_seed(0)
    g1_norm = min(1e3, 1e5 * alpha)  # g2 ≈ g1/α stays below ~2e4 per entry
    curvature = (0.5 + torch.rand(n, generator=g)) * g1_norm / (alpha * r)  # α·r·h/‖g1‖ ≈ 1: not parallel to g1
    model = _HalfQuadratic(curvature, dtype)
    trainer = GRTrainer(model=model, args=make_args(tmp_path, gr_lambda=alpha * r, gr_r=r))
    trainer.current_gradient_accumulation_steps = 1
    batches = []
    for _ in range(accumulation):
        mean = torch.randn(n, generator=g, dtype=torch.float64)
        mean = (mean * g1_norm / mean.norm()).to(dtype).double()  # x̄, exactly representable in `dtype`
        batches.append({"x": (mean + torch.tensor([[1.0], [-1.0]], dtype=torch.float64) * mean.flip(0)).float()})
    for batch in batches:
        trainer.training_step(model, batch)
    got = torch.cat([model.w.grad.flatten(), model.b.grad])
    assert got.dtype == dtype and torch.isfinite(got).all()

    h = curvature.double()
    plain = sum(b["x"].double().mean(0) for b in batches)
    want = sum(x + alpha * r * h * x / x.norm() for x in (b["x"].double().mean(0) for b in batches))
    assert float((want - plain).norm() / plain.norm()) > 0.3  # the GR term is not lost in rounding
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.01
    assert float((got.double() - want).norm() / (want - plain).norm()) < tolerance


# ---- the GR warmup follows the LR schedule ----


class _InfiniteAt(TrainerCallback):
    """Makes the loss inf at the given optimizer steps (the fp16 scaler then skips them)."""

    def __init__(self, steps):
        self.steps, self.inf = set(steps), False

    def on_step_begin(self, args, state, control, **kwargs):
        self.inf = state.global_step in self.steps


def test_fp16_scaler_through_the_trainer_loop_gives_the_unscaled_gr_update(tmp_path):
    runs = []
    for scaled in (False, True):
        model = TinyNet()
        args = make_args(tmp_path, max_steps=4, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
                         max_grad_norm=1.0, gr_lambda=0.05, fp16=scaled)  # fmt: skip
        trainer = SequentialGRTrainer(model=model, args=args, train_dataset=DictDataset(64))
        if scaled:
            scaler = attach_cpu_scaler(trainer)
        trainer.train()
        runs.append(params_of(model))
    assert scaler.get_scale() == 2.0**10 and trainer.lr_scheduler.last_epoch == 4  # no step skipped
    # the loss scale cancels in ε and is undone before clipping; float16 autocast costs ~1e-4 here
    assert max_rel_err(runs[1], runs[0]) < 1e-3


def test_gr_warmup_stays_on_the_lr_schedule_after_skipped_steps(tmp_path):
    callback = _InfiniteAt({1, 2})

    def loss(outputs, labels, num_items_in_batch=None):
        value = F.cross_entropy(outputs["logits"], labels)
        return value * float("inf") if callback.inf else value

    model = TinyNet()
    args = make_args(tmp_path, max_steps=9, warmup_steps=4, learning_rate=0.1, optim="sgd", logging_steps=1,
                     gr_warmup_strategy="zero", fp16=True)  # fmt: skip
    trainer = GRTrainer(model=model, args=args, train_dataset=DictDataset(64), compute_loss_func=loss,
                        callbacks=[callback])  # fmt: skip
    scaler = attach_cpu_scaler(trainer)
    trainer.train()
    assert scaler.get_scale() == 2.0**8  # two skips
    entries = [e for e in trainer.state.log_history if "gr_lambda" in e]
    lrs = [e["learning_rate"] for e in entries]
    on = [e["gr_lambda"] > 0 for e in entries]
    assert trainer.lr_scheduler.last_epoch == 9 - 2
    # the LR warmup reaches its peak at scheduler step 4 = global step 6 (two steps did not advance it), and GR
    # switches on with it, not at global step 4
    assert on == [False] * 6 + [True] * 3
    assert lrs == pytest.approx([0.0, 0.025, 0.025, 0.025, 0.05, 0.075, 0.1, 0.08, 0.06])  # GR on at the LR peak


def test_warmup_length_read_from_a_users_scheduler(tmp_path):
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=8)
    args = make_args(tmp_path, max_steps=8, logging_steps=1, gr_warmup_strategy="zero", warmup_steps=0)
    trainer = GRTrainer(model=model, args=args, train_dataset=DictDataset(64), optimizers=(optimizer, scheduler))
    trainer.train()
    assert trainer.gr_warmup_length() == 3
    assert [e["gr_lambda"] > 0 for e in trainer.state.log_history if "gr_lambda" in e] == [False] * 3 + [True] * 5


def test_a_scheduler_whose_warmup_cannot_be_read_warns(tmp_path, caplog):
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    args = make_args(tmp_path, max_steps=4, gr_warmup_strategy="zero", warmup_steps=2)
    trainer = GRTrainer(model=model, args=args, train_dataset=DictDataset(64), optimizers=(optimizer, scheduler))
    with caplog.at_level(logging.WARNING, logger="hf_gr.trainer"):
        trainer.train()
    assert "Cannot tell the LR warmup of the StepLR" in caplog.text and "gr_warmup_steps" in caplog.text
    assert trainer.gr_warmup_length() == 2  # from warmup_steps, as the warning says


# ---- parameters on several devices ----


def test_per_device_partial_norms_are_combined_on_one_device():
    grads = [torch.tensor([3.0]), torch.tensor([4.0], dtype=torch.float64), torch.tensor([12.0], dtype=torch.float16)]
    assert float(gradient.squared_norm(grads).sqrt()) == pytest.approx(13.0)
    combined = gradient.combine_partials(
        [torch.tensor(9.0), torch.tensor(16.0, dtype=torch.float64)], torch.device("cpu")
    )
    assert combined.dtype == torch.float64 and float(combined) == 25.0


# ---- README claims ----


def test_clipping_applies_to_the_gr_gradient(tmp_path):
    model, data = TinyNet(), DictDataset(16)
    want = reference_gr_grad(model, data.batch(0, 16), 0.1, 0.1)
    norm = float(torch.sqrt(sum((g**2).sum() for g in want)))
    max_norm = norm / 4
    before = params_of(model)
    args = make_args(tmp_path, per_device_train_batch_size=16, max_steps=1, optim="sgd", learning_rate=0.5,
                     lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=max_norm)  # fmt: skip
    SequentialGRTrainer(model=model, args=args, train_dataset=data).train()
    moved = [(b - a) / 0.5 for a, b in zip(params_of(model), before)]
    assert max_rel_err(moved, [g * max_norm / norm for g in want]) < 1e-5


class _TiedNet(torch.nn.Module):
    """fc1 and fc_tied share one weight (tied, as input and output embeddings of an LM)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(6, 6)
        self.fc_tied = torch.nn.Linear(6, 6, bias=False)
        self.fc_tied.weight = self.fc1.weight
        self.fc2 = torch.nn.Linear(6, 3)
        from transformers import PretrainedConfig

        self.config = PretrainedConfig()

    def forward(self, x, labels=None):
        logits = self.fc2(torch.tanh(self.fc_tied(torch.tanh(self.fc1(x)))))
        return {"logits": logits} if labels is None else {"logits": logits, "loss": F.cross_entropy(logits, labels)}


def test_tied_weights(tmp_path):
    model = _TiedNet()
    batch = DictDataset(16).batch(0, 16)
    step_trainer(tmp_path, model, gr_lambda=0.05).training_step(model, dict(batch))
    assert len(list(model.parameters())) == 4  # the tied weight once
    assert max_rel_err(grads_of(model), reference_gr_grad(model, batch, 0.05, 0.1)) < 1e-6


class _TwoSegmentNet(torch.nn.Module):
    """One weight used in two reentrant-checkpointed segments: its gradient arrives in two accumulations."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(6, 6)
        self.fc2 = torch.nn.Linear(6, 3)
        self.checkpointing = True
        from transformers import PretrainedConfig

        self.config = PretrainedConfig()

    def forward(self, x, labels=None):
        from torch.utils.checkpoint import checkpoint

        def segment(t):
            return torch.tanh(self.fc1(t))

        run = (lambda t: checkpoint(segment, t, use_reentrant=True)) if self.checkpointing else segment
        h = run(run(x))
        logits = self.fc2(h)
        return {"logits": logits} if labels is None else {"logits": logits, "loss": F.cross_entropy(logits, labels)}


@pytest.mark.parametrize("gr_lambda", [0.05, 0.1])
def test_a_gradient_that_arrives_in_parts(tmp_path, gr_lambda):
    model = _TwoSegmentNet()
    batch = DictDataset(16).batch(0, 16)
    batch["x"].requires_grad_(True)  # reentrant checkpointing needs an input that requires grad
    step_trainer(tmp_path, model, gr_lambda=gr_lambda).training_step(model, dict(batch))
    model.checkpointing = False  # the same function, without the segments, for the reference
    want = reference_gr_grad(model, {k: v.detach() for k, v in batch.items()}, gr_lambda, 0.1)
    assert max_rel_err(grads_of(model), want) < 1e-6


def test_models_sharded_at_load_time_are_refused(tmp_path):
    model = TinyNet()
    model.is_distributed_loading_by_transformers = True  # what `from_pretrained(tp_plan=...)` sets
    with pytest.raises(ValueError, match="sharded or tensor-parallel at load time"):
        GRTrainer(model=model, args=make_args(tmp_path))


def test_bf16_autocast_gr_gradient_matches_a_float64_reference(tmp_path):
    """A trainer that skipped GR under bf16 (the plain gradient) is far outside the tolerance: r is large here."""
    model = TinyNet(hidden=32)
    batch = DictDataset(32).batch(0, 32)
    trainer = step_trainer(tmp_path, model, bf16=True, gr_lambda=1.0, gr_r=1.0)
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.training_step(model, dict(batch))
    reference = TinyNet(hidden=32).double()
    b = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    want = reference_gr_grad(reference, b, 1.0, 1.0)
    plain = grad_at(reference, {n: p.detach() for n, p in reference.named_parameters()}, b)
    assert max_rel_err(grads_of(model), want) < 2e-2
    assert max_rel_err(plain, want) > 0.1  # the comparison above can fail


def test_first_term_normalized_matches_the_official_formula(tmp_path):
    """gr_first_term='normalized': g = (1 − α)·g1/‖g1‖ + α·g2 (the official code's default), from scratch."""
    model = TinyNet()
    batch = DictDataset(16).batch(0, 16)
    trainer = step_trainer(tmp_path, model, gr_lambda=0.05, gr_r=0.1, gr_first_term="normalized")
    trainer.training_step(model, dict(batch))
    params = {n: p.detach() for n, p in model.named_parameters()}
    g1 = grad_at(model, params, batch)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in g1))
    g2 = grad_at(model, {n: p + (0.1 / norm).float() * g for (n, p), g in zip(params.items(), g1)}, batch)
    want = [0.5 * a / norm.float() + 0.5 * b for a, b in zip(g1, g2)]
    assert max_rel_err(grads_of(model), want) < 1e-6
    raw = reference_gr_grad(model, batch, 0.05, 0.1)
    assert max_rel_err(raw, want) > 1e-2  # at α ≠ 1 the two terms differ


def test_first_term_normalized_is_refused_with_accumulation(tmp_path):
    with pytest.raises(ValueError, match="gr_first_term='normalized'"):
        GRTrainer(model=TinyNet(), args=make_args(tmp_path, gr_first_term="normalized", gradient_accumulation_steps=2))

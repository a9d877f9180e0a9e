"""GRDiagnosticsCallback: logged values against independent computations; nothing extra when off."""

import math

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from hf_gr import GRTrainer
from hf_gr._internal.metrics import GRMetrics
from hf_gr.diagnostics import ADAPTIVE_LR_KEYS, GRADIENT_KEYS, adaptive_lr_stats

from benchmarking import live_tensor_bytes
from gr_testing import DictDataset, SequentialGRTrainer, TinyNet, grad_at, make_args

R, STEPS = 0.1, 3


class SnapshotBeforeLastStep(TrainerCallback):
    def __init__(self):
        self.params = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == STEPS - 1:
            self.params = {n: p.detach().clone() for n, p in model.named_parameters()}


def _diagnostic_entries(trainer):
    return [e for e in trainer.state.log_history if "gr_grad_norm" in e or "adaptive_lr_mean" in e]


def test_logged_gradient_diagnostics_match_independent_computation(tmp_path):
    snapshot = SnapshotBeforeLastStep()
    data = DictDataset(64)
    args = make_args(
        tmp_path, max_steps=STEPS, gr_diagnostics_steps=STEPS, logging_steps=100, optim="adamw_torch",
        learning_rate=1e-2, lr_scheduler_type="constant", gr_lambda=0.05, gr_r=R,
    )  # fmt: skip
    model = TinyNet()
    trainer = SequentialGRTrainer(model=model, args=args, train_dataset=data, callbacks=[snapshot])
    trainer.train()
    (entry,) = _diagnostic_entries(trainer)
    assert entry["step"] == STEPS  # the entry logged after step s describes step s

    batch = data.batch(8 * (STEPS - 1), 8)
    g1 = grad_at(model, snapshot.params, batch)
    n1 = math.sqrt(sum(float((g**2).sum()) for g in g1))
    shifted = {k: p + R / n1 * g for (k, p), g in zip(snapshot.params.items(), g1)}
    g2 = grad_at(model, shifted, batch)
    n2 = math.sqrt(sum(float((g**2).sum()) for g in g2))
    cosine = sum(float((a * b).sum()) for a, b in zip(g1, g2)) / (n1 * n2)
    assert entry["gr_grad_norm"] == pytest.approx(n1, rel=1e-5)
    assert entry["gr_perturbed_grad_norm"] == pytest.approx(n2, rel=1e-5)
    assert entry["gr_cosine"] == pytest.approx(cosine, rel=1e-5)


class RecordAppliedGradients(TrainerCallback):
    """The gradients each optimizer step receives (after clipping), for an Adam recurrence written out here."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append([p.grad.detach().double().clone() for p in model.parameters()])


def _stats_from_rates(rates: np.ndarray, root: np.ndarray, eps: float) -> dict[str, float]:
    active = root > 10 * eps
    psi = 1 / (root[active] + eps)
    return {
        "adaptive_lr_mean": rates.mean(), "adaptive_lr_var": rates.var(), "adaptive_lr_max": rates.max(),
        "adaptive_lr_log_var": np.log(psi).var(), "adaptive_lr_inactive_fraction": 1 - active.mean(),
        "adaptive_psi_mean": psi.mean(), "adaptive_psi_var": psi.var(),
    }  # fmt: skip


def test_adaptive_lr_statistics_against_an_adam_recurrence(tmp_path):
    """The optimizer state is not read here: v̂ follows from the gradients AdamW received, by Adam's recurrence."""
    data = DictDataset(64)
    data.x[:, 0] = 0.0  # fc1's first input column never gets a gradient: inactive coordinates with state
    recorder = RecordAppliedGradients()
    lr, beta2, eps, steps = 1e-2, 0.999, 1e-8, 4
    args = make_args(
        tmp_path, max_steps=steps, gr_diagnostics_steps=steps, logging_steps=100, optim="adamw_torch",
        learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.3, max_grad_norm=0.5, gr_lambda=0.05,
    )  # fmt: skip
    trainer = SequentialGRTrainer(model=TinyNet(), args=args, train_dataset=data, callbacks=[recorder])
    trainer.train()
    (entry,) = [e for e in trainer.state.log_history if "adaptive_lr_log_var" in e]

    v = [np.zeros(g.shape) for g in recorder.steps[0]]
    for grads in recorder.steps:
        v = [beta2 * a + (1 - beta2) * g.numpy() ** 2 for a, g in zip(v, grads)]
    root = np.sqrt(np.concatenate([a.ravel() for a in v]) / (1 - beta2**steps))
    want = _stats_from_rates(lr / (root + eps), root, eps)
    assert want["adaptive_lr_inactive_fraction"] == pytest.approx(16 / 163)  # fc1.weight[:, 0]: 16 of 163
    for key, value in want.items():
        assert entry[key] == pytest.approx(float(value), rel=1e-6), key


def test_centered_rmsprop_and_amsgrad_statistics():
    grads = [torch.tensor([0.5, 1.0, -2.0, 0.0]), torch.tensor([0.25, -1.0, 1.0, 0.0])]
    p = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.RMSprop([p], lr=0.01, alpha=0.9, eps=1e-8, centered=True)
    v, mean = np.zeros(4), np.zeros(4)
    for g in grads:
        p.grad = g.clone()
        optimizer.step()
        v = 0.9 * v + 0.1 * g.double().numpy() ** 2
        mean = 0.9 * mean + 0.1 * g.double().numpy()
    root = np.sqrt(v - mean**2)
    want = _stats_from_rates(0.01 / (root + 1e-8), root, 1e-8)
    stats = adaptive_lr_stats(optimizer)
    assert set(stats) == set(want)
    for key, value in want.items():  # float32 state against a float64 recurrence
        assert stats[key] == pytest.approx(float(value), rel=1e-6), key

    q = torch.nn.Parameter(torch.ones(4))
    adam = torch.optim.Adam([q], lr=0.01, betas=(0.9, 0.999), eps=1e-8, amsgrad=True)
    v, v_max = np.zeros(4), np.zeros(4)
    for g in reversed(grads):  # the larger gradient first, so the running max differs from v
        q.grad = g.clone()
        adam.step()
        v = 0.999 * v + 0.001 * g.double().numpy() ** 2
        v_max = np.maximum(v_max, v)
    root = np.sqrt(v_max / (1 - 0.999**2))
    want = _stats_from_rates(0.01 / (root + 1e-8), root, 1e-8)
    for key, value in want.items():
        assert adaptive_lr_stats(adam)[key] == pytest.approx(float(value), rel=1e-6), key


def test_psi_statistics_follow_the_gradient_scale_and_the_log_variance_does_not():
    """Adam's recurrence by hand on two gradient histories, one c times the other: ψ = 1/(√v̂ + eps) over the
    active elements scales by 1/c (its mean) and 1/c² (its variance); the log-variance stays."""
    grads = [torch.tensor([0.5, 1.0, -2.0, 1e-12, 3.0]), torch.tensor([0.25, -1.0, 1.0, 0.0, -0.5])]
    stats = {}
    for c in (1.0, 0.1):
        q = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
        adam = torch.optim.Adam([q], lr=0.01, eps=1e-8)
        v = np.zeros(5)
        for g in grads:
            q.grad = c * g.double()
            adam.step()
            v = 0.999 * v + 0.001 * (c * g.double().numpy()) ** 2
        root = np.sqrt(v / (1 - 0.999**2))
        psi = 1 / (root[root > 1e-7] + 1e-8)  # the 4th element is inactive (√v̂ ≤ 10·eps)
        stats[c] = adaptive_lr_stats(adam)
        assert len(psi) == 4 and stats[c]["adaptive_lr_inactive_fraction"] == pytest.approx(0.2)
        assert stats[c]["adaptive_psi_mean"] == pytest.approx(psi.mean(), rel=1e-9)
        assert stats[c]["adaptive_psi_var"] == pytest.approx(psi.var(), rel=1e-9)
    assert stats[0.1]["adaptive_psi_mean"] == pytest.approx(10 * stats[1.0]["adaptive_psi_mean"], rel=1e-6)
    assert stats[0.1]["adaptive_psi_var"] == pytest.approx(100 * stats[1.0]["adaptive_psi_var"], rel=1e-5)
    assert stats[0.1]["adaptive_lr_log_var"] == pytest.approx(stats[1.0]["adaptive_lr_log_var"], rel=1e-5)


def test_rmsprop_statistics():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    optimizer = torch.optim.RMSprop([p], lr=0.01, alpha=0.9, eps=1e-8)
    p.grad = torch.tensor([0.5, 1.0, -2.0])
    optimizer.step()
    rates = 0.01 / ((0.1 * p.grad.double() ** 2).sqrt() + 1e-8)
    stats = adaptive_lr_stats(optimizer)
    assert stats["adaptive_lr_mean"] == pytest.approx(float(rates.mean()))
    assert stats["adaptive_lr_var"] == pytest.approx(float(rates.var(unbiased=False)))
    assert stats["adaptive_lr_max"] == pytest.approx(float(rates.max()))


def test_sgd_logs_gradient_diagnostics_only(tmp_path):
    args = make_args(tmp_path, max_steps=4, gr_diagnostics_steps=2, logging_steps=100, optim="sgd")
    trainer = GRTrainer(model=TinyNet(), args=args, train_dataset=DictDataset(64))
    trainer.train()
    entries = _diagnostic_entries(trainer)
    assert [e["step"] for e in entries] == [2, 4]
    assert all(k not in e for e in entries for k in ADAPTIVE_LR_KEYS)


class _MeasuringTrainer(GRTrainer):
    """Live tensor bytes at each pass's loss: pass 2 minus pass 1 is what GR holds there, `.grad` included."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.live.append(live_tensor_bytes(p.grad for p in model.parameters() if p.grad is not None))
        return super().compute_loss(model, inputs, *args, **kwargs)


@pytest.mark.parametrize(
    "gr_lambda, diagnostics, buffers",
    [
        (0.05, 0, 2),  # α = 0.5: the θ copy, and (1 − α)·g1 already in `.grad`
        (0.1, 0, 1),  # α = 1 (SAM): the θ copy only; g1 is dropped before pass 2
        (0.05, 1, 2),  # a diagnostic step measures g2 in the same hooks: nothing more
        (0.1, 1, 2),  # at α = 1 a diagnostic step keeps g1 for cos(g1, g2)
    ],
)
def test_memory_gr_holds_during_pass_two(tmp_path, gr_lambda, diagnostics, buffers):
    model = TinyNet(in_dim=64, hidden=512)  # parameters dominate the few activations
    args = make_args(tmp_path, max_steps=1, gr_diagnostics_steps=diagnostics, gr_lambda=gr_lambda, optim="sgd")
    trainer = _MeasuringTrainer(model=model, args=args, train_dataset=DictDataset(64, in_dim=64))
    trainer.live = []
    trainer.train()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    pass_one, pass_two = trainer.live  # live tensor bytes when each pass starts its forward
    held = (pass_two - pass_one) / param_bytes
    assert buffers - 0.05 < held < buffers + 0.05, held
    has_keys = any(k in e for e in trainer.state.log_history for k in GRADIENT_KEYS)
    assert has_keys == bool(diagnostics)


def test_plain_steps_log_the_gradient_norm(tmp_path):
    args = make_args(tmp_path, max_steps=3, gr_diagnostics_steps=1, logging_steps=1, gr_lambda=0.0, optim="sgd")
    trainer = GRTrainer(model=TinyNet(), args=args, train_dataset=DictDataset(64))
    trainer.train()
    entries = _diagnostic_entries(trainer)
    assert len(entries) == 3 and all("gr_perturbed_grad_norm" not in e for e in entries)
    for e in entries:  # the Trainer's own pre-clipping norm of the same gradient
        assert e["gr_grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-5)


def test_metrics_are_averaged_into_the_next_log_and_kept_as_running_sums(tmp_path):
    metrics = GRMetrics()
    metrics.add("a", 1.0)
    metrics.add("a", torch.tensor(3.0))
    metrics.add("b", 5.0)
    assert metrics.pop_means() == {"a": 2.0, "b": 5.0}
    assert metrics.pop_means() == {}  # cleared
    args = make_args(tmp_path, max_steps=30, logging_strategy="no")
    trainer = GRTrainer(model=TinyNet(), args=args, train_dataset=DictDataset(64))
    trainer.train()
    counts = {"gr_step_fraction": 30, "gr_reuse_fraction": 30, "gr_sharpness": 30}
    assert trainer.gr_metrics.counts == counts  # running sums: no list per step


@pytest.mark.parametrize("max_grad_norm", [1e6, 0.05], ids=["unclipped", "clipped"])
def test_update_size_is_the_applied_gradients_norm_under_sgd(tmp_path, max_grad_norm):
    """SGD without momentum or weight decay moves θ by lr·g: ‖Δθ‖/lr is the norm of the gradient it applied, the
    Trainer's own `grad_norm` (measured before clipping), or the clipping bound when clipping bites."""
    args = make_args(tmp_path, max_steps=3, gr_diagnostics_steps=1, logging_steps=1, gr_lambda=0.1, optim="sgd",
                     learning_rate=0.5, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=max_grad_norm)
    trainer = GRTrainer(model=TinyNet(), args=args, train_dataset=DictDataset(64))
    trainer.train()
    entries = _diagnostic_entries(trainer)
    assert len(entries) == 3
    for e in entries:
        assert e["update_size"] == pytest.approx(min(e["grad_norm"], max_grad_norm), rel=1e-4)

"""GR cheaper on every step: sub-batch ascent (`gr_ascent_fraction`), a ramped probability (`gr_probability_end`),
and `gr_sharpness` = L(θ + ε) − L(θ), each against a reference written here from the definitions."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from hf_gr import GradientRegularizer, GRArguments, GRTrainer
from hf_gr._internal import ascent, schedule
from hf_gr.trainer import _GRStepCallback

from gpu_check_lib import count_host_syncs
from gr_testing import (
    DictDataset,
    SequentialGRTrainer,
    TinyNet,
    grad_at,
    make_args,
    max_rel_err,
    params_of,
    reference_gr_grad,
    run_torchrun,
    step_trainer,
)

LR, BATCH, R = 0.5, 8, 0.1
SCRIPT = Path(__file__).parent / "distributed" / "ascent_runs.py"
sys.path.insert(0, str(SCRIPT.parent))
from fsdp2_gr_runs import BATCH as FSDP_BATCH  # noqa: E402
from fsdp2_gr_runs import STEPS as FSDP_STEPS  # noqa: E402
from fsdp2_gr_runs import TinyMLP, mlp_data  # noqa: E402


def _sgd_args(tmp_path, **overrides):
    defaults = dict(
        max_steps=3, per_device_train_batch_size=BATCH, optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, gr_lambda=R, gr_r=R,
    )  # fmt: skip
    defaults.update(overrides)
    return make_args(tmp_path, **defaults)


def _kinds(trainer) -> list[str]:
    entries = [e for e in trainer.state.log_history if "gr_step_fraction" in e]
    return ["gr" if e["gr_step_fraction"] else "plain" for e in entries]


def _rows(batch: dict, n: int) -> dict:
    return {k: v[:n] for k, v in batch.items()}


def _norm(grads) -> torch.Tensor:
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads))


def _ascent_grad(model, params: dict, batch: dict, sub: dict, r: float = R) -> list[torch.Tensor]:
    """g2 = ∇L_batch(θ + r·d), d the direction of g1 = ∇L_sub(θ): the direction from `sub`, the update from `batch`."""
    g1 = grad_at(model, params, sub)
    norm = _norm(g1)
    shifted = {n: p + (r / norm).to(p.dtype) * g for (n, p), g in zip(params.items(), g1)}
    return grad_at(model, shifted, batch)


def _sgd_(model, update) -> None:
    with torch.no_grad():
        for p, g in zip(model.parameters(), update):
            p -= LR * g


# ---- sub-batch ascent ----


def _ascent_reference(data, steps: int, accumulation: int, fraction: float, kinds=None, lambdas=None):
    """SGD whose GR steps take their direction from the first ⌈f·B⌉ rows and their update from all B at θ + ε.

    `kinds`/`lambdas` per step: "plain"; "gr" with λ_t < r (α_t < 1: the full-batch (1 − α)·g1 + α·g2); "gr" at λ = r.
    """
    model = TinyNet()
    n = math.ceil(fraction * BATCH)
    for step in range(steps):
        kind = kinds[step] if kinds else "gr"
        gr_lambda = lambdas[step] if lambdas else R
        update = None
        for j in range(accumulation):
            batch = data.batch((step * accumulation + j) * BATCH, BATCH)
            params = {name: p.detach() for name, p in model.named_parameters()}
            if kind == "plain":
                g = grad_at(model, params, batch)
            elif gr_lambda < R:
                g = reference_gr_grad(model, batch, gr_lambda, R)
            else:
                g = _ascent_grad(model, params, batch, _rows(batch, n))
            g = [x / accumulation for x in g]
            update = g if update is None else [a + b for a, b in zip(update, g)]
        _sgd_(model, update)
    return model


def test_sub_batch_ascent_with_accumulation_matches_the_reference(tmp_path):
    model, data = TinyNet(), DictDataset(64)
    args = _sgd_args(tmp_path, gradient_accumulation_steps=2, gr_ascent_fraction=0.5)
    trainer = SequentialGRTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert _kinds(trainer) == ["gr"] * 3
    want = _ascent_reference(data, 3, 2, 0.5)
    assert max_rel_err(params_of(model), params_of(want)) < 1e-6
    # and the reference tells the sub-batch from the whole one: full-batch SAM lands elsewhere
    assert max_rel_err(params_of(model), params_of(_ascent_reference(data, 3, 2, 1.0))) > 1e-4
    assert model.forward_calls == 3 * 2 * 2  # two passes per micro-batch


def test_sub_batch_ascent_takes_the_whole_batch_on_lambda_warmup_steps(tmp_path):
    """λ-warmup over W = 2: t = 0 plain, t = 1 α_t = 0.5 (pass 1 on the whole micro-batch), t ≥ 2 sub-batch ascent."""
    model, data = TinyNet(), DictDataset(64)
    args = _sgd_args(tmp_path, max_steps=4, gr_ascent_fraction=0.25, gr_warmup_strategy="lambda", gr_warmup_steps=2)
    trainer = SequentialGRTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert _kinds(trainer) == ["plain", "gr", "gr", "gr"]
    want = _ascent_reference(data, 4, 1, 0.25, kinds=["plain", "gr", "gr", "gr"], lambdas=[0.0, R / 2, R, R])
    assert max_rel_err(params_of(model), params_of(want)) < 1e-6
    sharpness = [e.get("gr_sharpness") for e in trainer.state.log_history if "gr_step_fraction" in e]
    assert sharpness[1] is not None and sharpness[2] is None and sharpness[3] is None  # only where pass 1 saw all


class _PerCallRecords(SequentialGRTrainer):
    """Records per `compute_loss` call, as TRL's trainers do (`_metrics`, a token total)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._metrics = {"train": {"rows": []}}
        self._total_train_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = len(inputs["labels"])
        self._metrics["train"]["rows"].append(rows)
        self._total_train_tokens += rows
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_per_call_records_count_the_whole_micro_batch_once(tmp_path, fraction):
    args = _sgd_args(tmp_path, max_steps=2, gr_ascent_fraction=fraction, logging_strategy="no")
    trainer = _PerCallRecords(model=TinyNet(), args=args, train_dataset=DictDataset(64))
    trainer.train()
    assert trainer._metrics["train"]["rows"] == [BATCH, BATCH]
    assert trainer._total_train_tokens == 2 * BATCH


def test_the_logged_loss_with_a_sub_batch_is_the_whole_batch_at_the_perturbed_point(tmp_path):
    model, data = TinyNet(), DictDataset(64)
    trainer = SequentialGRTrainer(model=model, args=_sgd_args(tmp_path, max_steps=1, gr_ascent_fraction=0.25),
                                  train_dataset=data)  # fmt: skip
    reference = TinyNet()
    batch = data.batch(0, BATCH)
    params = {n: p.detach() for n, p in reference.named_parameters()}
    g1 = grad_at(reference, params, _rows(batch, 2))
    norm = _norm(g1)
    shifted = {n: p + (R / norm).to(p.dtype) * g for (n, p), g in zip(params.items(), g1)}
    want = F.cross_entropy(functional_call(reference, shifted, args=(), kwargs={"x": batch["x"]})["logits"],
                           batch["labels"])  # fmt: skip
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(float(want), rel=1e-5)


def test_sft_sub_batch_ascent_matches_the_reference_and_counts_every_token_once(tmp_path):
    """TRL's SFTTrainer: the padded LM batch is sliced by row; SFT's token count is the whole batch's, once."""
    pytest.importorskip("trl")
    from test_trl import (
        CapturingGRSFTTrainer,
        GRSFTConfig,
        Recorder,
        make_lm,
        make_text_dataset,
        make_tokenizer,
        sft_args,
        sft_loss,
    )  # fmt: skip
    from trl import SFTConfig, SFTTrainer

    tokenizer = make_tokenizer()
    model, reference = make_lm(tokenizer), make_lm(tokenizer)
    args = sft_args(tmp_path, GRSFTConfig, max_steps=1, gr_lambda=R, gr_r=R, gr_ascent_fraction=0.5)
    trainer = CapturingGRSFTTrainer(model=model, args=args, train_dataset=make_text_dataset(),
                                    processing_class=tokenizer)  # fmt: skip
    recorder = Recorder(model)
    trainer.add_callback(recorder)
    trainer.train()
    ((batch, num_items),) = trainer.seen
    assert len(batch["input_ids"]) == 4

    params = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}

    def grad(point, rows):
        leaves = {n: p.clone().requires_grad_(True) for n, p in point.items()}
        loss = sft_loss(reference, leaves, {k: v[:rows] for k, v in batch.items()}, num_items)
        return list(torch.autograd.grad(loss, list(leaves.values())))

    g1 = grad(params, 2)
    norm = _norm(g1)
    g2 = grad({n: p + (R / norm).float() * g for (n, p), g in zip(params.items(), g1)}, 4)
    assert max_rel_err(recorder.grads[0], g2) < 1e-5
    g1_whole = grad(params, 4)  # the control: the whole batch's direction gives another update
    norm = _norm(g1_whole)
    other = grad({n: p + (R / norm).float() * g for (n, p), g in zip(params.items(), g1_whole)}, 4)
    assert max_rel_err(recorder.grads[0], other) > 1e-4

    plain = SFTTrainer(model=make_lm(tokenizer), args=sft_args(tmp_path, SFTConfig, output_dir=str(tmp_path / "p"),
                       max_steps=1), train_dataset=make_text_dataset(), processing_class=tokenizer)  # fmt: skip
    plain.train()
    tokens = [[e.get("num_tokens") for e in t.state.log_history if "loss" in e] for t in (trainer, plain)]
    assert tokens[0] == tokens[1] and tokens[1][0] > 0


# ---- refusals ----


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(gr_ascent_fraction=0.0), r"gr_ascent_fraction must be in \(0, 1\]"),
        (dict(gr_ascent_fraction=1.5), r"gr_ascent_fraction must be in \(0, 1\]"),
        (dict(gr_ascent_fraction=0.5, gr_lambda=0.05), "needs gr_lambda == gr_r"),
        (dict(gr_ascent_fraction=0.5, gr_method="exact"), "gr_method='finite_difference'"),
        (dict(gr_ascent_fraction=0.5, gr_first_term="normalized"), "gr_first_term='raw'"),
        (dict(gr_ascent_fraction=0.5, gr_reuse=True, gr_interval=2), "cannot be combined with gr_reuse"),
        (dict(gr_probability_end=0.0), r"gr_probability_end must be in \(0, 1\] or None"),
        (dict(gr_probability_end=1.5), r"gr_probability_end must be in \(0, 1\] or None"),
    ],
)
def test_bad_values_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        GRArguments(**{"gr_lambda": R, "gr_r": R, **overrides})


@pytest.mark.parametrize("strategy, sub_batch", [("r", True), ("zero", True), ("lambda", False)])
def test_which_warmup_steps_take_a_sub_batch(strategy, sub_batch):
    """r- and zero-warmup keep α_t = 1 exactly (a sub-batch); λ-warmup's α_t < 1 needs the whole micro-batch."""
    for fraction in (0.1, 0.3, 0.7):
        gr_lambda, gr_r = schedule.warmup_coefficients(strategy, R, R, fraction)
        plan = schedule.plan_step(gr_lambda, gr_r, 0)
        if plan.kind == "gr":
            assert ascent.pass_fraction(plan, 0.25) == (0.25 if sub_batch else 1.0)
    assert ascent.pass_fraction(schedule.plan_step(R, R, 0), 0.25) == 0.25  # after the warmup: α = 1
    assert ascent.pass_fraction(schedule.plan_step(0.0, R, 0), 0.25) == 1.0  # a plain step


def test_sub_batch_size_is_the_ceiling():
    assert [ascent.ascent_size(b, f) for b, f in ((32, 0.25), (30, 0.1), (10, 0.25), (3, 0.01), (8, 1.0))] == [
        8, 3, 3, 1, 8,
    ]  # fmt: skip


def test_sub_batch_ascent_with_gr_off_is_accepted():
    assert GRArguments(gr_lambda=0.0, gr_r=R, gr_ascent_fraction=0.5).gr_ascent_fraction == 0.5


@pytest.mark.parametrize(
    "extra, message",
    [
        (dict(cu_seq_lens_q=torch.tensor([0, 3, 8])), "packed into rows \\(cu_seq_lens_q\\)"),
        (dict(mask=torch.ones(3)), "'mask' has shape \\(3,\\)"),
    ],
)
def test_inputs_that_cannot_be_sliced_by_sample_are_refused(tmp_path, extra, message):
    model = TinyNet()
    trainer = step_trainer(tmp_path, model, gr_lambda=R, gr_r=R, gr_ascent_fraction=0.5)
    before = params_of(model)
    with pytest.raises(ValueError, match=message):
        trainer.training_step(model, {**DictDataset(16).batch(0, BATCH), **extra})
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model)))
    assert all(p.grad is None for p in model.parameters())  # refused before any pass


def test_a_micro_batch_too_small_to_slice_warns(tmp_path):
    model = TinyNet()
    trainer = step_trainer(tmp_path, model, gr_lambda=R, gr_r=R, gr_ascent_fraction=0.5)
    with pytest.warns(UserWarning, match="no saving"):
        trainer.training_step(model, DictDataset(16).batch(0, 1))


def test_custom_loop_backward_refuses_sub_batch_ascent():
    model = TinyNet()
    args = GRArguments(gr_lambda=R, gr_r=R, gr_warmup_strategy="none", gr_ascent_fraction=0.5)
    with pytest.raises(ValueError, match="backward\\(loss_fn\\) cannot slice"):  # refused when constructed
        GradientRegularizer(model, args=args)
    assert all(p.grad is None for p in model.parameters())


# ---- the ramped probability ----


def _ramp(t: int, start: float, end: float, t0: int, total: int) -> float:
    """p_t written out: start before t0, linear to `end` at the last step total − 1."""
    return start + (end - start) * min(1.0, max(0.0, (t - t0) / (total - 1 - t0)))


def test_ramped_probability_by_hand():
    assert schedule.ramped_probability(0.2, 1.0, 0, 2, 12) == 0.2
    assert schedule.ramped_probability(0.2, 1.0, 2, 2, 12) == 0.2
    assert schedule.ramped_probability(0.2, 1.0, 11, 2, 12) == 1.0
    assert schedule.ramped_probability(0.2, 1.0, 20, 2, 12) == 1.0
    assert schedule.ramped_probability(0.2, 1.0, 5, 2, 12) == pytest.approx(0.2 + 0.8 * 3 / 9)
    assert schedule.ramped_probability(0.2, None, 11, 2, 12) == 0.2
    # the first eligible step of each warmup strategy, W = 5: zero at W, λ and r once f(t) > 0, none at once
    first = {s: schedule.first_eligible_step(lambda f, s=s: schedule.warmup_coefficients(s, R, R, f), 5)
             for s in ("zero", "lambda", "r", "none")}  # fmt: skip
    assert first == {"zero": 5, "lambda": 1, "r": 1, "none": 0}


def test_training_draws_the_ramped_steps(tmp_path):
    args = _sgd_args(tmp_path, max_steps=12, gr_probability=0.2, gr_probability_end=1.0, gr_warmup_strategy="zero",
                     gr_warmup_steps=2, seed=0)  # fmt: skip
    trainer = SequentialGRTrainer(model=TinyNet(), args=args, train_dataset=DictDataset(96))
    trainer.train()
    want = ["gr" if t >= 2 and schedule.uniform(0, t) < _ramp(t, 0.2, 1.0, 2, 12) else "plain" for t in range(12)]
    constant = ["gr" if t >= 2 and schedule.uniform(0, t) < 0.2 else "plain" for t in range(12)]
    assert _kinds(trainer) == want
    assert want != constant and "plain" in want[2:]  # the ramp changed the draws, and they are still draws


def test_custom_loop_draws_the_ramped_steps():
    model, data = TinyNet(), DictDataset(96)
    args = GRArguments(gr_lambda=R, gr_r=R, gr_warmup_strategy="lambda", gr_warmup_steps=3, gr_probability=0.3,
                       gr_probability_end=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="pass total_steps="):
        GradientRegularizer(model, args=args, seed=1).backward(lambda: model(**data.batch(0, 4))["loss"])
    model.zero_grad()
    regularizer = GradientRegularizer(model, args=args, seed=1, total_steps=10)
    passes = []
    for t in range(10):
        calls = []
        regularizer.backward(lambda t=t, calls=calls: calls.append(1) or model(**data.batch(4 * t, 4))["loss"])
        model.zero_grad()
        passes.append(len(calls))
    # λ-warmup: λ_0 = 0, eligible from t0 = 1
    want = [2 if t >= 1 and schedule.uniform(1, t) < _ramp(t, 0.3, 1.0, 1, 10) else 1 for t in range(10)]
    assert passes == want and 1 in want[1:]


def test_resume_mid_ramp_with_sub_batch_ascent_is_bit_identical(tmp_path):
    modes = dict(gr_probability=0.3, gr_probability_end=1.0, gr_ascent_fraction=0.5)

    def run(output_dir, resume=None):
        args = make_args(
            tmp_path, output_dir=str(output_dir), max_steps=10, optim="adamw_torch", learning_rate=1e-2,
            save_strategy="steps", save_steps=4, logging_steps=1, gr_lambda=R, gr_r=R, seed=1, **modes,
        )  # fmt: skip
        model = TinyNet(dropout=0.2)
        trainer = GRTrainer(model=model, args=args, train_dataset=DictDataset(64))
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    full, full_trainer = run(tmp_path / "full")
    resumed, resumed_trainer = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-4"))
    assert all(torch.equal(a, b) for a, b in zip(params_of(full), params_of(resumed)))
    want = ["gr" if schedule.uniform(1, t) < _ramp(t, 0.3, 1.0, 0, 10) else "plain" for t in range(10)]
    assert _kinds(full_trainer) == want
    assert _kinds(resumed_trainer) == want  # the resumed state's log holds the steps before the checkpoint too
    assert "plain" in want[4:] and "gr" in want[4:]


# ---- gr_sharpness ----


def test_sharpness_equals_the_perturbed_loss_rise_averaged_over_the_gr_steps_of_each_log(tmp_path):
    """p = 0.5 (seed 0: steps 0, 1, 3, 4, 5 are GR steps), accumulation 2, a log every 2 steps: each entry holds the
    mean over its GR steps of Σ_m (L_m(θ + ε_m) − L_m(θ)) / 2, ε_m from micro-batch m's own g1."""
    model, data = TinyNet(), DictDataset(96)
    args = _sgd_args(tmp_path, max_steps=6, gradient_accumulation_steps=2, gr_probability=0.5, logging_steps=2)
    trainer = SequentialGRTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    kinds = ["gr" if schedule.uniform(0, t) < 0.5 else "plain" for t in range(6)]
    assert kinds == ["gr", "gr", "plain", "gr", "gr", "gr"]

    reference = TinyNet()
    per_step = []
    for t, kind in enumerate(kinds):
        update, rise = None, 0.0
        for j in range(2):
            batch = data.batch((2 * t + j) * BATCH, BATCH)
            params = {n: p.detach() for n, p in reference.named_parameters()}
            g1 = grad_at(reference, params, batch)
            if kind == "gr":
                norm = _norm(g1)
                shifted = {n: p + (R / norm).to(p.dtype) * g for (n, p), g in zip(params.items(), g1)}

                def loss_at(at, batch=batch):
                    out = functional_call(reference, at, args=(), kwargs={"x": batch["x"]})
                    return float(F.cross_entropy(out["logits"], batch["labels"]))

                rise += (loss_at(shifted) - loss_at(params)) / 2
                g = reference_gr_grad(reference, batch, R, R)
            else:
                g = g1
            update = [x / 2 for x in g] if update is None else [a + x / 2 for a, x in zip(update, g)]
        per_step.append(rise if kind == "gr" else None)
        _sgd_(reference, update)
    assert max_rel_err(params_of(model), params_of(reference)) < 1e-6

    logged = [e.get("gr_sharpness") for e in trainer.state.log_history if "gr_step_fraction" in e]
    want = []
    for window in (per_step[0:2], per_step[2:4], per_step[4:6]):
        values = [v for v in window if v is not None]
        want.append(sum(values) / len(values))
    assert logged == pytest.approx(want, rel=1e-5)
    assert all(v > 0 for v in want)  # the loss rises along the gradient: the comparison is not 0 == 0


def test_sharpness_is_not_logged_with_a_sub_batch(tmp_path):
    trainer = SequentialGRTrainer(model=TinyNet(), args=_sgd_args(tmp_path, gr_ascent_fraction=0.5),
                                  train_dataset=DictDataset(64))  # fmt: skip
    trainer.train()
    entries = [e for e in trainer.state.log_history if "gr_step_fraction" in e]
    assert len(entries) == 3 and not any("gr_sharpness" in e for e in entries)


@pytest.mark.parametrize("fraction", [0.5, 1.0], ids=["sub_batch", "sharpness"])
def test_a_gr_step_reads_nothing_back_to_the_host(tmp_path, fraction):
    model, data = TinyNet(dropout=0.1), DictDataset(32)
    trainer = step_trainer(tmp_path, model, gr_lambda=R, gr_r=R, gr_ascent_fraction=fraction,
                           gradient_accumulation_steps=2)  # fmt: skip
    step_callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, _GRStepCallback))
    trainer.training_step(model, data.batch(0, 8))  # warm-up (lazy allocations)
    with count_host_syncs() as counts:
        for step in range(2):
            trainer.state.global_step = step
            step_callback.on_step_begin(trainer.args, trainer.state, trainer.control)
            trainer.training_step(model, data.batch(8, 8))
            trainer.training_step(model, data.batch(16, 8))
            step_callback.on_step_end(trainer.args, trainer.state, trainer.control)
    assert counts["n"] == 0
    assert ("gr_sharpness" in trainer.gr_metrics.sums) == (fraction == 1.0)  # it was measured, on the device


# ---- DDP and FSDP2 (torchrun, gloo) ----

WORLD, DDP_BATCH = 2, 4


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ascent")
    out = tmp / "results.pt"
    return run_torchrun(SCRIPT, out, tmp, nproc=WORLD)


def _ddp_batches(data, micro: int) -> list[dict]:
    """Rank r's micro-batch `micro`: batch micro·WORLD + r of the data in order (the DistributedSampler's split)."""
    per_epoch = len(data) // DDP_BATCH
    return [data.batch(((micro * WORLD + r) % per_epoch) * DDP_BATCH, DDP_BATCH) for r in range(WORLD)]


def _ddp_ascent_reference(accumulation: int, sync: bool) -> list[torch.Tensor]:
    """One process replaying the replicas: each perturbs along its own sub-batch g1 (or their mean when synced),
    computes g2 on its whole micro-batch, and SGD takes the replica mean."""
    model, data = TinyNet(), DictDataset(48)
    for step in range(3):
        update = None
        for j in range(accumulation):
            batches = _ddp_batches(data, step * accumulation + j)
            params = {n: p.detach() for n, p in model.named_parameters()}
            g1s = [grad_at(model, params, _rows(b, DDP_BATCH // 2)) for b in batches]
            if sync:
                g1s = [[sum(gs) / WORLD for gs in zip(*g1s)]] * WORLD
            for b, g1 in zip(batches, g1s):
                norm = _norm(g1)
                shifted = {n: p + (R / norm).to(p.dtype) * g for (n, p), g in zip(params.items(), g1)}
                g = [x / (WORLD * accumulation) for x in grad_at(model, shifted, b)]
                update = g if update is None else [a + x for a, x in zip(update, g)]
        _sgd_(model, update)
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("run, accumulation, sync", [("ascent_ga2", 2, False), ("ascent_sync", 1, True)])
def test_ddp_sub_batch_ascent_matches_the_single_process_reference(distributed_results, run, accumulation, sync):
    assert distributed_results["world_size"] == WORLD
    got = distributed_results[run]["params"]
    assert max_rel_err(got, _ddp_ascent_reference(accumulation, sync)) < 1e-6
    assert max_rel_err(got, _ddp_ascent_reference(accumulation, not sync)) > 1e-5  # per-replica ≠ synced


def test_ddp_sub_batch_ascent_communicates_as_plain_training(distributed_results):
    # (gradient all-reduces seen by DDP's comm hook, all dist.all_reduce calls, the hook's own included) per step:
    # a plain step's (1, 1) (pass 1 under no_sync); the synced direction adds one flat all-reduce
    assert distributed_results["ascent_ga2"]["collectives"] == [(1, 1)] * 3
    assert distributed_results["ascent_sync"]["collectives"] == [(1, 2)] * 3


def test_ddp_sharpness_is_the_replica_mean(distributed_results):
    model, data = TinyNet(), DictDataset(48)
    want = []
    for step in range(3):
        params = {n: p.detach() for n, p in model.named_parameters()}
        rises = []
        for b in _ddp_batches(data, step):
            g1 = grad_at(model, params, b)
            norm = _norm(g1)
            shifted = {n: p + (R / norm).to(p.dtype) * g for (n, p), g in zip(params.items(), g1)}

            def loss_at(at, b=b):
                return float(F.cross_entropy(functional_call(model, at, args=(), kwargs={"x": b["x"]})["logits"],
                                             b["labels"]))  # fmt: skip

            rises.append(loss_at(shifted) - loss_at(params))
        want.append(sum(rises) / WORLD)
        g = [sum(gs) / WORLD for gs in zip(*(reference_gr_grad(model, b, R, R) for b in _ddp_batches(data, step)))]
        _sgd_(model, g)
    per_rank = distributed_results["sharpness"]["sharpness_per_rank"]
    assert per_rank[0] == per_rank[1]  # every replica logs the mean
    assert per_rank[0] == pytest.approx(want, rel=1e-5)


def test_fsdp2_sub_batch_ascent_matches_the_reference(distributed_results):
    """FSDP2 reduce-scatters pass 1: ε follows the mean over ranks of the sub-batch g1s, i.e. the gradient over the
    first half of every rank's rows; g2 is over all rows."""
    run = distributed_results["fsdp_ascent_ga2"]
    assert all(run["restored_per_rank"])
    model = TinyMLP()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = mlp_data(FSDP_STEPS * 2)
    sub_rows = torch.cat([torch.arange(r * FSDP_BATCH, r * FSDP_BATCH + FSDP_BATCH // 2) for r in range(WORLD)])

    def grad(at, micro, rows=None):
        leaves = {n: p.detach().clone().requires_grad_(True) for n, p in at.items()}
        xs, ys = (x[micro], y[micro]) if rows is None else (x[micro, rows], y[micro, rows])
        loss = F.mse_loss(functional_call(model, leaves, args=(xs,)), ys) / 2
        return list(torch.autograd.grad(loss, list(leaves.values())))

    for step in range(FSDP_STEPS):
        update = None
        for j in range(2):
            micro = 2 * step + j
            g1 = grad(params, micro, sub_rows)
            norm = _norm(g1)
            g2 = grad({n: p + (R / norm).to(p.dtype) * g for (n, p), g in zip(params.items(), g1)}, micro)
            update = g2 if update is None else [a + b for a, b in zip(update, g2)]
        params = {n: p - LR * u for (n, p), u in zip(params.items(), update)}
    assert max_rel_err([run["params"][n] for n in params], list(params.values())) < 1e-6

"""The cheaper GR modes: interval, probability (the official code's hybrid mode) and reuse (LookSAM)."""

import pytest
import torch

from hf_gr import GRArguments, GRTrainer
from hf_gr._internal import gradient, schedule

from gr_testing import (
    DictDataset,
    SequentialGRTrainer,
    TinyNet,
    grad_at,
    make_args,
    max_rel_err,
    params_of,
    reference_gr_grad,
    reference_reuse_direction,
)

LR, BATCH = 0.5, 8


def _sgd_args(tmp_path, **overrides):
    defaults = dict(
        max_steps=8, per_device_train_batch_size=BATCH, optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, gr_lambda=0.1, gr_r=0.1,
    )  # fmt: skip
    defaults.update(overrides)
    return make_args(tmp_path, **defaults)


def _kinds(trainer) -> list[str]:
    """The kind of each optimizer step, from the log: GR steps log λ > 0, reuse steps a reuse fraction of 1."""
    entries = [e for e in trainer.state.log_history if "gr_step_fraction" in e]
    return ["gr" if e["gr_step_fraction"] else "reuse" if e["gr_reuse_fraction"] else "plain" for e in entries]


# ---- the draws ----


def test_draws_are_a_pure_function_of_seed_and_step():
    steps = range(2000)
    first = [schedule.uniform(0, t) for t in steps]
    assert first == [schedule.uniform(0, t) for t in steps]  # the same on a rerun, on every replica, after resume
    assert first != [schedule.uniform(1, t) for t in steps]  # another seed, other draws
    chosen = [u < 0.5 for u in first]
    assert 0.45 < sum(chosen) / len(chosen) < 0.55
    assert all(0.0 <= u < 1.0 for u in first)


def test_draws_consume_no_rng():
    state = torch.get_rng_state()
    schedule.plan_step(0.1, 0.1, 7, probability=0.5, seed=3)
    assert torch.equal(state, torch.get_rng_state())


def test_probability_one_and_interval_one_is_every_step():
    plans = [schedule.plan_step(0.1, 0.1, t) for t in range(20)]
    assert all(p.kind == "gr" and p.gr_lambda == 0.1 for p in plans)


@pytest.mark.parametrize("seed", [0, 1])
def test_training_takes_the_drawn_gr_steps_and_reruns_identically(tmp_path, seed):
    runs = []
    for _ in range(2):
        trainer = SequentialGRTrainer(
            model=TinyNet(), args=_sgd_args(tmp_path, max_steps=12, gr_probability=0.5, seed=seed),
            train_dataset=DictDataset(64),
        )  # fmt: skip
        trainer.train()
        runs.append(_kinds(trainer))
    want = ["gr" if schedule.uniform(seed, t) < 0.5 else "plain" for t in range(12)]
    assert runs[0] == runs[1] == want
    assert "gr" in want and "plain" in want


def test_other_seed_other_gr_steps():
    first = ["gr" if schedule.uniform(0, t) < 0.5 else "plain" for t in range(12)]
    second = ["gr" if schedule.uniform(1, t) < 0.5 else "plain" for t in range(12)]
    assert first != second


def test_interval_counts_global_steps_after_zero_warmup(tmp_path):
    args = _sgd_args(tmp_path, max_steps=14, warmup_steps=5, gr_warmup_strategy="zero", gr_interval=4)
    trainer = SequentialGRTrainer(model=TinyNet(), args=args, train_dataset=DictDataset(64))
    trainer.train()
    # eligible from t = W = 5 on; candidates where t % 4 == 0: t = 8 and 12 (t = 4 is still in the warmup)
    assert [t for t, kind in enumerate(_kinds(trainer)) if kind == "gr"] == [8, 12]
    lambdas = [e["gr_lambda"] for e in trainer.state.log_history if "gr_lambda" in e]
    assert [t for t, lam in enumerate(lambdas) if lam > 0] == [8, 12]  # every other step logs λ = 0


# ---- what the steps compute ----


def test_training_equals_a_simulation_of_its_gr_and_plain_steps(tmp_path):
    model, data = TinyNet(), DictDataset(64)
    trainer = SequentialGRTrainer(model=model, args=_sgd_args(tmp_path, gr_probability=0.5), train_dataset=data)
    trainer.train()
    kinds = _kinds(trainer)
    assert set(kinds) == {"gr", "plain"}

    reference = TinyNet()
    for t, kind in enumerate(kinds):
        batch = data.batch(t * BATCH, BATCH)
        if kind == "gr":
            g = reference_gr_grad(reference, batch, 0.1, 0.1)
        else:
            g = grad_at(reference, {n: p.detach() for n, p in reference.named_parameters()}, batch)
        with torch.no_grad():
            for p, x in zip(reference.parameters(), g):
                p -= LR * x
    assert max_rel_err(params_of(model), params_of(reference)) < 1e-6
    assert model.forward_calls == 8 + kinds.count("gr")  # one pass per plain step, two per GR step


def test_reuse_formula_against_a_hand_computation():
    g1 = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    g_gr = [torch.tensor([3.0, 1.0]), torch.tensor([[4.5]])]
    # by hand: c = (0, 1, 0.5), ⟨c, g1⟩ = 2, ‖g1‖² = 25, c⊥ = (0, 1, 0.5) − 0.08·(3, 0, 4) = (−0.24, 1, 0.18)
    c_perp = torch.tensor([-0.24, 1.0, 0.18], dtype=torch.float64)
    kept = torch.cat([x.flatten() for x in g1]).clone()
    views = [kept[0:2], kept[2:3].view(1, 1)]
    rho = gradient.orthogonal_correction_(kept, views, g_gr)
    assert torch.allclose(kept.double(), c_perp / c_perp.norm(), atol=1e-6)
    assert float(rho) == pytest.approx(float(c_perp.norm()) / 5.0, rel=1e-6)
    u, want_rho = reference_reuse_direction(g_gr, g1)
    assert torch.allclose(torch.cat([v.double().flatten() for v in views]), torch.cat(u), atol=1e-6)

    g = [torch.tensor([1.0, 2.0]), torch.tensor([[2.0]])]  # ‖g‖ = 3
    gradient.add_correction_(g, views, rho, torch.tensor(3.0))
    want = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64) + want_rho * 3.0 * torch.cat(u)
    assert torch.allclose(torch.cat([x.double().flatten() for x in g]), want, atol=1e-6)


def test_reuse_without_a_direction_is_a_plain_step():
    g1 = [torch.tensor([1.0, 2.0])]
    kept = g1[0].clone()
    rho = gradient.orthogonal_correction_(kept, [kept], [g1[0] * 3])  # g_GR ∥ g1: c⊥ = 0
    assert float(rho) == 0.0 and torch.equal(kept, torch.zeros(2))


@pytest.mark.parametrize("gr_lambda", [0.2, 0.1], ids=["alpha1", "alpha0.5"])
def test_reuse_training_equals_a_simulation(tmp_path, gr_lambda):
    """At α ≠ 1 the kept correction is that of the α-weighted GR gradient, c = g_GR − g1 = α·(g2 − g1)."""
    model, data = TinyNet(), DictDataset(64)
    args = _sgd_args(tmp_path, max_steps=6, gr_interval=3, gr_reuse=True, gr_lambda=gr_lambda, gr_r=0.2)
    trainer = SequentialGRTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert _kinds(trainer) == ["gr", "reuse", "reuse", "gr", "reuse", "reuse"]

    reference = TinyNet()
    u, rho = None, 0.0
    for t in range(6):
        batch = data.batch(t * BATCH, BATCH)
        params = {n: p.detach() for n, p in reference.named_parameters()}
        g = grad_at(reference, params, batch)
        if t % 3 == 0:
            g_gr = reference_gr_grad(reference, batch, gr_lambda, 0.2)
            u, rho = reference_reuse_direction(g_gr, g)
            g = g_gr
        else:
            norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g))
            g = [x + rho * norm * d.view_as(x) for x, d in zip(g, u)]
        with torch.no_grad():
            for p, x in zip(reference.parameters(), g):
                p -= LR * x.to(p.dtype)
    assert max_rel_err(params_of(model), params_of(reference)) < 1e-5


def test_reuse_before_the_first_gr_step_is_plain(tmp_path):
    model, data = TinyNet(), DictDataset(64)
    args = _sgd_args(tmp_path, max_steps=3, warmup_steps=2, gr_warmup_strategy="zero", gr_reuse=True, gr_interval=4)
    trainer = SequentialGRTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert _kinds(trainer) == ["plain", "plain", "reuse"]  # t = 2 is eligible, not a candidate: reuse, no u yet
    reference = TinyNet()
    for t in range(3):
        g = grad_at(reference, {n: p.detach() for n, p in reference.named_parameters()}, data.batch(t * BATCH, BATCH))
        with torch.no_grad():
            for p, x in zip(reference.parameters(), g):
                p -= LR * x
    assert max_rel_err(params_of(model), params_of(reference)) < 1e-6


# ---- resume ----


REUSE_MODES = dict(gr_interval=3, gr_reuse=True)


def _resume_run(tmp_path, output_dir, modes, resume=None, as_path=False):
    """10 steps with AdamW and dropout, saving every 4 steps; resumed from `resume` when given (a `pathlib.Path`
    with `as_path`, else a str)."""
    args = make_args(
        tmp_path, output_dir=str(output_dir), max_steps=10, optim="adamw_torch", learning_rate=1e-2,
        save_strategy="steps", save_steps=4, logging_steps=1, **modes,
    )  # fmt: skip
    model = TinyNet(dropout=0.2)
    trainer = GRTrainer(model=model, args=args, train_dataset=DictDataset(64))
    trainer.train(resume_from_checkpoint=None if resume is None else resume if as_path else str(resume))
    return model, trainer


@pytest.mark.parametrize(
    "modes, as_path", [(dict(gr_probability=0.5), False), (REUSE_MODES, False), (REUSE_MODES, True)],
    ids=["p", "reuse", "reuse-pathlib"],
)
def test_resume_mid_cycle_is_bit_identical(tmp_path, modes, as_path):
    full, full_trainer = _resume_run(tmp_path, tmp_path / "full", modes)
    resumed, resumed_trainer = _resume_run(
        tmp_path, tmp_path / "resumed", modes, tmp_path / "full" / "checkpoint-4", as_path=as_path
    )
    assert all(torch.equal(a, b) for a, b in zip(params_of(full), params_of(resumed)))
    assert _kinds(resumed_trainer) == _kinds(full_trainer)
    if modes.get("gr_reuse"):  # step 4 is a reuse step: it needs the u and ρ saved at step 3's checkpoint
        assert (tmp_path / "full" / "checkpoint-4" / "gr_state.pt").is_file()
        assert _kinds(full_trainer)[4] == "reuse"


def test_resume_without_the_saved_direction_differs(tmp_path):
    """The negative control of `test_resume_mid_cycle_is_bit_identical[reuse]`: the same runs, with only gr_state.pt
    removed from the checkpoint, take the same kinds of steps but do not continue exactly."""
    full, full_trainer = _resume_run(tmp_path, tmp_path / "full", REUSE_MODES)
    (tmp_path / "full" / "checkpoint-4" / "gr_state.pt").unlink()
    resumed, resumed_trainer = _resume_run(
        tmp_path, tmp_path / "resumed", REUSE_MODES, tmp_path / "full" / "checkpoint-4"
    )
    assert _kinds(resumed_trainer) == _kinds(full_trainer)
    assert not all(torch.equal(a, b) for a, b in zip(params_of(full), params_of(resumed)))


# ---- arguments ----


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(gr_probability=0.0), "gr_probability must be in \\(0, 1\\]"),
        (dict(gr_probability=1.5), "gr_probability must be in \\(0, 1\\]"),
        (dict(gr_interval=0), "gr_interval must be an integer >= 1"),
        (dict(gr_reuse=True, gr_method="exact"), "gr_reuse needs gr_method='finite_difference'"),
    ],
)
def test_bad_mode_values_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        GRArguments(**overrides)


def test_model_card_records_the_modes(tmp_path):
    from huggingface_hub import ModelCard

    args = _sgd_args(tmp_path, max_steps=2, gr_probability=0.5, gr_interval=2, gr_reuse=True)
    trainer = GRTrainer(model=TinyNet(), args=args, train_dataset=DictDataset(64))
    trainer.train()
    trainer.create_model_card()
    block = ModelCard.load(tmp_path / "out" / "README.md").data.hf_gr
    assert (block["gr_probability"], block["gr_interval"], block["gr_reuse"]) == (0.5, 2, True)

"""The GR warmup strategies: schedules step by step, zero-warmup = plain training, exact resume."""

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from hf_gr import GRTrainer, LambdaWarmupCallback, RWarmupCallback, ZeroWarmupCallback

from gr_testing import (
    DictDataset,
    SequentialGRTrainer,
    StepUpdates,
    TinyNet,
    grad_at,
    make_args,
    max_rel_err,
    params_of,
    reference_gr_grad,
)

W, STEPS, LAMBDA, R = 8, 14, 0.06, 0.1


def _expected(strategy: str, t: int) -> tuple[float, float]:
    """(λ_t, r_t) from the paper's formulas, written out independently of hf_gr.callbacks."""
    f = min(1.0, t / W)
    alpha = LAMBDA / R
    if strategy == "lambda":
        return alpha * f * R, R
    if strategy == "r":
        return alpha * (R * f), R * f
    if strategy == "zero":
        return (0.0 if t < W else LAMBDA), R
    return LAMBDA, R


def _logged(trainer) -> list[tuple[int, float, float]]:
    return [(e["step"], e["gr_lambda"], e["gr_r"]) for e in trainer.state.log_history if "gr_lambda" in e]


@pytest.mark.parametrize("w_from", ["lr_warmup", "gr_warmup_steps"])
@pytest.mark.parametrize("strategy", ["lambda", "r", "zero", "none"])
def test_each_step_applies_and_logs_the_warmup_formulas(tmp_path, strategy, w_from):
    """Each step's update (SGD) is lr_t times the GR gradient with λ_t and r_t from the formulas, computed from
    scratch in float64 at the parameters the step started from; and the log says the same λ_t and r_t. W is the LR
    warmup's (lr_t = min(1, t/W)) or `gr_warmup_steps` with a constant LR (lr_t = 1)."""
    model, data, updates = TinyNet().double(), DictDataset(64, dtype=torch.float64), StepUpdates()
    if w_from == "lr_warmup":
        schedule = dict(warmup_steps=W, lr_scheduler_type="constant_with_warmup")
    else:
        schedule = dict(gr_warmup_steps=W, lr_scheduler_type="constant")
    args = make_args(
        tmp_path, max_steps=STEPS, logging_steps=1, gr_warmup_strategy=strategy, gr_lambda=LAMBDA, gr_r=R,
        optim="sgd", learning_rate=1.0, max_grad_norm=0.0, **schedule,
    )  # fmt: skip
    trainer = SequentialGRTrainer(model=model, args=args, train_dataset=data, callbacks=[updates])
    trainer.train()
    assert len(updates.before) == STEPS
    for t, (before, applied) in enumerate(zip(updates.before, updates.applied(1.0))):
        lr = min(1.0, t / W) if w_from == "lr_warmup" else 1.0
        if lr == 0.0:
            assert all(torch.equal(a, torch.zeros_like(a)) for a in applied)
            continue
        reference = TinyNet().double()
        with torch.no_grad():
            for p, value in zip(reference.parameters(), before):
                p.copy_(value)
        batch = data.batch(8 * (t % 8), 8)
        gr_lambda, gr_r = _expected(strategy, t)
        if gr_lambda == 0.0 or gr_r == 0.0:
            want = grad_at(reference, dict(reference.named_parameters()), batch)
        else:
            want = reference_gr_grad(reference, batch, gr_lambda, gr_r)
        error = max_rel_err([a / lr for a in applied], want)
        assert error < 1e-10, (t, error)

    logged = _logged(trainer)
    assert [s for s, _, _ in logged] == list(range(1, STEPS + 1))
    for step, lam, r in logged:  # the entry logged after step s describes the step that started at s - 1
        want_lam, want_r = _expected(strategy, step - 1)
        assert lam == pytest.approx(want_lam, rel=1e-12, abs=1e-15) and r == pytest.approx(want_r, rel=1e-12)


def test_zero_warmup_steps_are_plain_steps(tmp_path):
    runs = {}
    for name, overrides in {"zero": dict(gr_warmup_strategy="zero"), "plain": dict(gr_lambda=0.0)}.items():
        model = TinyNet(dropout=0.2)
        args = make_args(tmp_path, max_steps=W, warmup_steps=W, learning_rate=1e-2, **overrides)
        GRTrainer(model=model, args=args, train_dataset=DictDataset(64)).train()
        runs[name] = model
    assert all(torch.equal(a, b) for a, b in zip(params_of(runs["zero"]), params_of(runs["plain"])))
    assert runs["zero"].forward_calls == W  # one forward/backward per warmup step


def test_gr_warmup_steps_overrides_lr_warmup(tmp_path):
    args = make_args(
        tmp_path, max_steps=20, warmup_steps=10, gr_warmup_steps=4, logging_steps=1, gr_warmup_strategy="zero"
    )
    trainer = GRTrainer(model=TinyNet(), args=args, train_dataset=DictDataset(64))
    trainer.train()
    assert trainer.gr_warmup_length() == 4
    lam = {e["step"]: e["gr_lambda"] for e in trainer.state.log_history if "gr_lambda" in e}
    assert lam[4] == 0.0 and lam[5] == args.gr_lambda  # zero-warmup ends at t = 4, not at the LR's 10


def test_lr_warmup_ratio_is_honoured(tmp_path):
    args = make_args(tmp_path, max_steps=16, warmup_steps=0.25, logging_steps=1, gr_warmup_strategy="zero")
    trainer = GRTrainer(model=TinyNet(), args=args, train_dataset=DictDataset(64))
    trainer.train()
    assert trainer.gr_warmup_length() == 4  # transformers 5.x: a warmup_steps below 1 is a ratio
    assert [s for s, lam, _ in _logged(trainer) if lam == 0.0] == [1, 2, 3, 4]


def test_callback_passed_by_user_replaces_the_flag(tmp_path):
    args = make_args(tmp_path, max_steps=6, logging_steps=1, gr_warmup_strategy="zero", gr_warmup_steps=4)
    callback = RWarmupCallback(warmup_steps=4)
    trainer = GRTrainer(model=TinyNet(), args=args, train_dataset=DictDataset(64), callbacks=[callback])
    warmups = [c for c in trainer.callback_handler.callbacks if isinstance(c, (ZeroWarmupCallback, RWarmupCallback))]
    assert warmups == [callback] and trainer.args.gr_warmup_strategy == "r"
    trainer.train()
    assert _logged(trainer)[0][2] == 0.0  # r-warmup: r_0 = 0, a plain step


def test_two_warmup_callbacks_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at most one"):
        GRTrainer(model=TinyNet(), args=make_args(tmp_path), callbacks=[LambdaWarmupCallback(), ZeroWarmupCallback()])


def test_base_callback_is_refused_at_construction(tmp_path):
    from hf_gr import GRWarmupCallback

    with pytest.raises(ValueError, match="LambdaWarmupCallback, RWarmupCallback or ZeroWarmupCallback"):
        GRTrainer(model=TinyNet(), args=make_args(tmp_path), callbacks=[GRWarmupCallback()])


def _tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )  # fmt: skip
    return ViTForImageClassification(config)


def _images(n: int = 48) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (n,), generator=g)
    pixels = torch.randn(n, 3, 8, 8, generator=g)
    return [{"pixel_values": p, "labels": y} for p, y in zip(pixels, labels)]


@pytest.mark.parametrize("strategy", ["lambda", "r", "zero"])
def test_resume_inside_warmup_is_bit_identical(tmp_path, strategy):
    def run(output_dir, resume=None):
        args = make_args(
            tmp_path, output_dir=str(output_dir), max_steps=12, warmup_steps=6, gr_warmup_strategy=strategy,
            optim="adamw_torch", learning_rate=1e-3, lr_scheduler_type="cosine", save_strategy="steps", save_steps=4,
            per_device_train_batch_size=8, logging_steps=1,
        )  # fmt: skip
        model = _tiny_vit()
        trainer = GRTrainer(model=model, args=args, train_dataset=_images())
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    full, full_trainer = run(tmp_path / "full")
    resumed, resumed_trainer = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-4"))
    assert all(torch.equal(a, b) for a, b in zip(params_of(full), params_of(resumed)))
    assert _logged(resumed_trainer) == _logged(full_trainer)  # the resumed history continues the saved one
    assert resumed_trainer.state.global_step == 12


def test_callback_warmup_length_is_recorded_in_the_arguments(tmp_path):
    trainer = GRTrainer(model=TinyNet(), args=make_args(tmp_path), callbacks=[LambdaWarmupCallback(warmup_steps=7)])
    assert (trainer.args.gr_warmup_strategy, trainer.args.gr_warmup_steps) == ("lambda", 7)

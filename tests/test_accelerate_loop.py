"""GR in a custom Accelerate loop: `GradientRegularizer(model, accelerator, args).backward(loss_fn)` in place of
`accelerator.backward(loss)`, single-process against the GR reference, over real DDP (torchrun, gloo) against
`GRTrainer`, and the example `scripts/train_accelerate.py`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import PretrainedConfig, get_constant_schedule

from hf_gr import GradientRegularizer, GRArguments
from hf_gr._internal import schedule

from gr_testing import (
    DictDataset,
    SequentialGRTrainer,
    TinyNet,
    grad_at,
    grads_of,
    make_args,
    max_rel_err,
    params_of,
    reference_gr_grad,
    run_torchrun,
)

ROOT = Path(__file__).resolve().parents[1]
LAMBDA, R, LR = 0.05, 0.1, 0.5


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test builds its own Accelerator; leave no accumulation setting behind for the next test."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def loss_fn(model, batch):
    return lambda: model(**batch)["loss"]


def test_backward_matches_reference():
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(TinyNet(dropout=0.3))
    regularizer = GradientRegularizer(model, accelerator, GRArguments(gr_lambda=LAMBDA, gr_r=R,
                                                                      gr_warmup_strategy="none"))  # fmt: skip
    batch = DictDataset(16).batch(0, 16)
    torch.manual_seed(11)
    loss = regularizer.backward(loss_fn(model, batch))
    assert model.forward_calls == 2 and regularizer.completed_steps == 1
    assert max_rel_err(grads_of(model), reference_gr_grad(model, batch, LAMBDA, R, seed=11)) < 1e-6
    torch.manual_seed(11)
    assert loss == torch.nn.functional.cross_entropy(model(**batch)["logits"], batch["labels"])  # pass 1's loss


def _expected_coefficients(strategy: str, step: int, warmup: int) -> tuple[float, float]:
    """(λ_t, r_t) from the paper's formulas, f(t) = min(1, t/W)."""
    f = min(1.0, step / warmup) if warmup else 1.0
    if strategy == "lambda":
        return LAMBDA * f, R
    if strategy == "r":
        return (LAMBDA / R) * R * f, R * f
    if strategy == "zero":
        return (LAMBDA if f >= 1.0 else 0.0), R
    return LAMBDA, R


def _reference_training(strategy: str, warmup: int, accumulation: int, steps: int, batch_size: int):
    """SGD on the mean over each step's micro-batches of their GR (or, with λ_t = 0, plain) gradients."""
    model, data = TinyNet(), DictDataset(48)
    for step in range(steps):
        gr_lambda, gr_r = _expected_coefficients(strategy, step, warmup)
        update = None
        for j in range(accumulation):
            batch = data.batch((step * accumulation + j) * batch_size, batch_size)
            if gr_lambda > 0:
                g = reference_gr_grad(model, batch, gr_lambda, gr_r)
            else:
                g = grad_at(model, {n: p.detach() for n, p in model.named_parameters()}, batch)
            g = [x / accumulation for x in g]
            update = g if update is None else [a + b for a, b in zip(update, g)]
        with torch.no_grad():
            for p, x in zip(model.parameters(), update):
                p -= LR * x
    return params_of(model)


@pytest.mark.parametrize(
    "strategy, warmup, accumulation",
    [("none", None, 2), ("zero", 1, 2), ("lambda", 2, 2), ("r", 2, 1)],
)
def test_accumulate_and_warmup_match_reference(strategy, warmup, accumulation):
    steps, batch_size = 3, 8
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    dataloader = DataLoader(DictDataset(48), batch_size=batch_size)
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    args = GRArguments(gr_lambda=LAMBDA, gr_r=R, gr_warmup_strategy=strategy, gr_warmup_steps=warmup)
    regularizer = GradientRegularizer(model, accelerator, args)
    lambdas = []
    for batch in dataloader:
        with accelerator.accumulate(model):
            if accelerator.sync_gradients:  # the step's last micro-batch: read its plan before it advances
                plan = regularizer.planner.plan(regularizer.completed_steps, regularizer.warmup_step, warmup or 0)
                lambdas.append(plan.gr_lambda)
            regularizer.backward(loss_fn(model, batch))
            optimizer.step()
            optimizer.zero_grad()
        if regularizer.completed_steps == steps:
            break
    assert lambdas == [_expected_coefficients(strategy, t, warmup or 0)[0] for t in range(steps)]
    assert max_rel_err(params_of(model), _reference_training(strategy, warmup, accumulation, steps, batch_size)) < 1e-6


@pytest.mark.parametrize(
    "modes",
    [
        dict(gr_interval=3, gr_reuse=True),
        dict(gr_probability=0.5),
        dict(gr_warmup_strategy="lambda", gr_warmup_steps=3),
    ],
)
def test_loop_takes_the_trainers_steps(tmp_path, modes):
    """The cheaper modes and the warmup plan the same steps as `GRTrainer` (6 steps, accumulation 2, dropout)."""
    gr = {"gr_lambda": LAMBDA, "gr_r": R, "gr_warmup_strategy": "none", **modes}
    args = make_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=6,
                     optim="sgd", learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                     **gr)  # fmt: skip
    trained = TinyNet(dropout=0.2)
    SequentialGRTrainer(model=trained, args=args, train_dataset=DictDataset(48)).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = TinyNet(dropout=0.2)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, DataLoader(DictDataset(48), batch_size=4))
    regularizer = GradientRegularizer(model, accelerator, GRArguments(**gr), seed=args.seed)  # the draws' seed
    torch.manual_seed(args.seed)  # as the Trainer's set_seed(args.seed): the same dropout masks
    for batch in dataloader:
        with accelerator.accumulate(model):
            regularizer.backward(loss_fn(model, batch))
            optimizer.step()
            optimizer.zero_grad()
        if regularizer.completed_steps == 6:
            break
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), params_of(trained)))


class _LinearRegression(nn.Module):
    """ŷ = w·x in float64, L = ½·mean((ŷ − y)²): ∇L = Xᵀ(Xw − y)/n and H = XᵀX/n, so GR's two passes are exact."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(3, 1, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.w.weight.copy_(torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64))
        self.config = PretrainedConfig()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        prediction = self.w(x).squeeze(-1)
        out = {"logits": prediction}
        if labels is not None:
            out["loss"] = 0.5 * ((prediction - labels) ** 2).mean()
        return out


class _Rows(Dataset):
    def __init__(self, n: int = 40) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 3, generator=g, dtype=torch.float64)
        self.labels = self.x @ torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64) + 0.3 * torch.randn(
            n, generator=g, dtype=torch.float64
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.labels[i]}


WARMUP_W, WARMUP_STEPS, WARMUP_BATCH = 3, 5, 4


def _lambda_warmup_by_hand() -> torch.Tensor:
    """w after 5 SGD steps (accumulation 2) of λ-warmup GR, written out: λ_t = λ·min(1, t/W); per micro-batch j (loss
    divided by 2), g_j = (g1 + λ_t·H·g1/‖g1‖)/2 with g1 = Xᵀ(Xw − y)/n, H = XᵀX/n (g1 + α·(g2 − g1) with α = λ_t/r
    and g2 = g1 + H·r·g1/‖g1‖: the finite difference is exact on a quadratic)."""
    data, w = _Rows(), torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    for t in range(WARMUP_STEPS):
        lambda_t = LAMBDA * min(1.0, t / WARMUP_W)
        update = torch.zeros(3, dtype=torch.float64)
        for j in range(2):
            rows = slice((2 * t + j) * WARMUP_BATCH, (2 * t + j + 1) * WARMUP_BATCH)
            x, y = data.x[rows], data.labels[rows]
            g1 = x.T @ (x @ w - y) / len(y)
            update += (g1 + lambda_t * (x.T @ x / len(y)) @ g1 / g1.norm()) / 2
        w = w - LR * update
    return w


def _lambda_warmup_run(loop: str, tmp_path) -> torch.Tensor:
    """w after the same 5 steps through GRTrainer, a custom Accelerate loop, or a plain PyTorch loop."""
    gr = dict(gr_lambda=LAMBDA, gr_r=R, gr_warmup_strategy="lambda", gr_warmup_steps=WARMUP_W)
    model = _LinearRegression()
    if loop == "trainer":
        args = make_args(tmp_path, per_device_train_batch_size=WARMUP_BATCH, gradient_accumulation_steps=2,
                         max_steps=WARMUP_STEPS, optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
                         weight_decay=0.0, max_grad_norm=0.0, **gr)  # fmt: skip
        SequentialGRTrainer(model=model, args=args, train_dataset=_Rows()).train()
        return model.w.weight.detach().reshape(-1)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2) if loop == "accelerate" else None
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    dataloader = DataLoader(_Rows(), batch_size=WARMUP_BATCH)
    if accelerator is not None:
        model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
        regularizer = GradientRegularizer(model, accelerator, GRArguments(**gr))
    else:
        regularizer = GradientRegularizer(model, args=GRArguments(**gr), gradient_accumulation_steps=2)
    for i, batch in enumerate(dataloader):
        if accelerator is not None:
            with accelerator.accumulate(model):
                regularizer.backward(loss_fn(model, batch))
                optimizer.step()
                optimizer.zero_grad()
        else:
            regularizer.backward(lambda batch=batch: model(**batch)["loss"] / 2)
            if i % 2 == 1:
                optimizer.step()
                optimizer.zero_grad()
        if regularizer.completed_steps == WARMUP_STEPS:
            break
    return model.w.weight.detach().reshape(-1).clone()


@pytest.mark.parametrize("loop", ["trainer", "accelerate", "plain"])
def test_lambda_warmup_matches_a_hand_computation(tmp_path, loop):
    """The λ-warmup's wiring (λ_t at each step, from the LR schedule's count) against SGD written out in float64."""
    got, want = _lambda_warmup_run(loop, tmp_path), _lambda_warmup_by_hand()
    assert torch.allclose(got, want, rtol=1e-12, atol=0.0), (got - want).abs().max()


@pytest.mark.parametrize("loop", ["trainer", "accelerate", "plain"])
def test_the_hand_computation_catches_an_ignored_warmup(tmp_path, monkeypatch, loop):
    """With the warmup ignored (f(t) = 1: full λ from the first step) the same run is far from the hand computation."""
    monkeypatch.setattr(schedule, "warmup_fraction", lambda step, warmup_steps: 1.0)
    got, want = _lambda_warmup_run(loop, tmp_path), _lambda_warmup_by_hand()
    assert (got - want).abs().max() > 1e-4 * want.abs().max()


def test_warmup_without_its_length_is_refused():
    with pytest.raises(ValueError, match="gr_warmup_steps"):  # refused when constructed
        GradientRegularizer(TinyNet(), None, GRArguments(gr_warmup_strategy="zero"))


def _train(accelerator, model, optimizer, regularizer, batches, upto: int) -> None:
    while regularizer.completed_steps < upto:
        batch = batches[regularizer.completed_steps]
        with accelerator.accumulate(model):
            regularizer.backward(loss_fn(model, batch))
            optimizer.step()
            optimizer.zero_grad()


def _setup(seed: int):
    accelerator = Accelerator(cpu=True)
    model = TinyNet(dropout=0.3, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    args = GRArguments(gr_lambda=LAMBDA, gr_r=R, gr_warmup_strategy="zero", gr_warmup_steps=3)
    regularizer = GradientRegularizer(model, accelerator, args)
    accelerator.register_for_checkpointing(regularizer)
    return accelerator, model, optimizer, regularizer


def test_save_and_load_state_round_trip_is_bit_identical(tmp_path):
    data = DictDataset(48)
    batches = [data.batch(8 * i, 8) for i in range(6)]
    accelerator, model, optimizer, regularizer = _setup(seed=0)
    _train(accelerator, model, optimizer, regularizer, batches, upto=2)  # inside the zero-warmup (W = 3)
    accelerator.save_state(str(tmp_path / "state"))
    assert (tmp_path / "state" / "custom_checkpoint_0.pkl").is_file()  # the regularizer's state_dict
    _train(accelerator, model, optimizer, regularizer, batches, upto=6)
    uninterrupted = params_of(model)

    accelerator, model, optimizer, regularizer = _setup(seed=1)  # another init: a silent non-load would show
    accelerator.load_state(str(tmp_path / "state"))
    assert regularizer.completed_steps == 2  # the warmup goes on from t = 2, not from 0
    _train(accelerator, model, optimizer, regularizer, batches, upto=6)
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), uninterrupted))


# ---- the example script ----


def test_example_script_trains_and_resumes(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_accelerate

    common = ["--epochs", "2", "--gradient_accumulation_steps", "2", "--warmup_steps", "10"]
    full = train_accelerate.main(common + ["--checkpoint_dir", str(tmp_path)])
    assert full["steps"] == 2 * (1437 // 32 // 2) and full["eval_accuracy"] > 0.7  # 44 batches, 22 steps an epoch
    GradientState._reset_state()
    resumed = train_accelerate.main(common + ["--resume_from_checkpoint", str(tmp_path / "epoch_0")])
    assert resumed == full  # the same last loss, accuracy and step count after resuming at the epoch boundary
    assert "epoch 1:" in capsys.readouterr().out


@pytest.mark.slow  # accelerate launch: a subprocess of its own
def test_example_script_under_accelerate_launch():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "scripts" / "train_accelerate.py"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = [line for line in proc.stdout.splitlines() if line.startswith("epoch 3:")]
    assert last and float(last[0].split("eval accuracy ")[1].split(",")[0]) > 0.85


# ---- two processes (torchrun, gloo) ----


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accelerate_ddp")
    out = tmp / "results.pt"
    results = run_torchrun(Path(__file__).parent / "distributed" / "accelerate_loop_runs.py", out, tmp, timeout=300)
    results["script_per_rank"] = [torch.load(f"{out}.script_rank{rank}") for rank in range(2)]
    return results


@pytest.mark.parametrize(
    "setting, forwards",
    [("ga1", 6), ("ga2", 12), ("ga2_zero_warmup", 10), ("ga2_plain", 6), ("ga2_zero_warmup_scheduler", 8)],
)
def test_ddp_loop_matches_the_trainer(ddp_results, setting, forwards):
    result = ddp_results[setting]
    assert ddp_results["world_size"] == 2 and result["steps"] == 3
    assert max_rel_err(result["params"], result["trainer"]) < 1e-6
    assert result["forwards"] == forwards  # per replica: 3 steps × micro-batches × (2 passes on GR steps)
    assert result["all_reduces"] == [1, 1, 1]  # one gradient all-reduce per optimizer step, as in plain training


def test_ddp_gr_differs_from_plain(ddp_results):
    assert max_rel_err(ddp_results["ga2"]["params"], ddp_results["ga2_plain"]["params"]) > 1e-3


def test_example_script_under_torchrun(ddp_results):
    rank0, rank1 = ddp_results["script_per_rank"]
    assert rank0["steps"] == rank1["steps"] == 1437 // 32 // 2  # the data is sharded: half the steps per epoch
    assert rank0["eval_accuracy"] == rank1["eval_accuracy"] > 0.5  # evaluated on the gathered predictions


@pytest.mark.parametrize("with_scheduler", [False, True])
def test_warmup_follows_the_lr_schedule_when_the_fp16_scaler_skips_a_step(with_scheduler):
    """A step the scaler skips moves neither the LR schedule nor the GR warmup (as in GRTrainer), counted by the
    regularizer or read from the prepared scheduler (which does not step then)."""
    accelerator = Accelerator(cpu=True)
    accelerator.native_amp = True  # accelerate makes no GradScaler on CPU; torch's CPU one drives the same path
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = accelerator.prepare(get_constant_schedule(optimizer)) if with_scheduler else None
    args = GRArguments(gr_warmup_strategy="zero", gr_warmup_steps=3)
    regularizer = GradientRegularizer(model, accelerator, args, lr_scheduler=scheduler)
    data = DictDataset(64)
    passes = []
    for step in range(6):
        batch = data.batch(8 * step, 8)

        def loss(batch=batch, step=step):
            value = model(**batch)["loss"]
            return value * float("inf") if step == 1 else value

        before = model.forward_calls
        regularizer.backward(loss)
        passes.append(model.forward_calls - before)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad()
    assert accelerator.scaler.get_scale() == 2.0**9  # step 1 was skipped
    assert passes == [1, 1, 1, 1, 2, 2]  # GR from step 4 = LR-schedule step 3, not from step 3
    assert regularizer.warmup_step == 5 and regularizer.completed_steps == 6

"""GR in a plain PyTorch loop (no Accelerate) with gradient accumulation: the regularizer counts optimizer steps, not
micro-batches, so the warmup and `gr_interval` take their GR steps where `GRTrainer` takes them. One process here;
DDP and FSDP2 under torchrun (gloo). Each run is checked against `GRTrainer` and a from-scratch reference."""

import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from hf_gr import GradientRegularizer, GRArguments

from gr_testing import DictDataset, TinyNet, grad_at, max_rel_err, reference_gr_grad, run_torchrun

SCRIPT = Path(__file__).parent / "distributed" / "plain_loop_runs.py"
sys.path.insert(0, str(SCRIPT.parent))
from plain_loop_runs import (  # noqa: E402
    ACCUMULATION,
    BATCH,
    INTERVAL,
    LAMBDA,
    LR,
    ROWS,
    STEPS,
    W,
    micro_batch,
    plain_loop,
    trainer_run,
)

# By hand: zero-warmup is plain for t < W; from t = W, GR on every INTERVAL-th step.
GR_STEPS = [t for t in range(STEPS) if t >= W and t % INTERVAL == 0]
FORWARDS = [ACCUMULATION * (2 if t in GR_STEPS else 1) for t in range(STEPS)]  # 2 passes per GR micro-batch


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def reference_training(lrs: list[float], world: int = 1, synced: bool = False) -> list[torch.Tensor]:
    """SGD on the mean over micro-batches and replicas of each one's GR gradient on GR_STEPS, its gradient elsewhere.

    `synced`: each replica perturbs along the replicas' mean g1 (FSDP2, `gr_sync_perturbation`), else its own.
    """
    model, data = TinyNet(), DictDataset(ROWS)
    for step in range(STEPS):
        update = [torch.zeros_like(p) for p in model.parameters()]
        params = {n: p.detach() for n, p in model.named_parameters()}
        for j in range(ACCUMULATION):
            batches = [micro_batch(data, step, j, rank, world) for rank in range(world)]
            mean_g1 = None
            if synced:
                g1s = [grad_at(model, params, b) for b in batches]
                mean_g1 = [sum(parts) / world for parts in zip(*g1s)]
            for batch in batches:
                if step in GR_STEPS:
                    g = reference_gr_grad(model, batch, LAMBDA, 0.1, g1_override=mean_g1)
                else:
                    g = grad_at(model, params, batch)
                update = [u + x / (ACCUMULATION * world) for u, x in zip(update, g)]
        with torch.no_grad():
            for p, u in zip(model.parameters(), update):
                p -= lrs[step] * u
    return [p.detach().clone() for p in model.parameters()]


CONSTANT = [LR] * STEPS
WARMING = [LR * min(1.0, t / W) for t in range(STEPS)]  # constant_with_warmup: lr·t/W for t < W


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plain_loop_trainer")
    runs = {"constant": trainer_run(str(tmp / "constant"))}
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    runs["lr_warmup"] = trainer_run(str(tmp / "lr_warmup"), lr_warmup=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return runs


@pytest.mark.parametrize("how", ["gradient_accumulation_steps", "sync_gradients", "lr_scheduler"])
def test_plain_loop_takes_the_trainers_gr_steps(trainer_runs, how):
    model = TinyNet()
    loop = plain_loop(model, model, how)
    trainer = trainer_runs["lr_warmup" if how == "lr_scheduler" else "constant"]
    assert GR_STEPS == [2, 4] and FORWARDS == [2, 2, 4, 2, 4, 2]
    assert trainer["forwards"] == loop["forwards"] == FORWARDS
    assert loop["completed"] == list(range(1, STEPS + 1)) and loop["warmup_step"] == STEPS
    assert all(torch.equal(a, b) for a, b in zip(loop["params"], trainer["params"]))
    want = reference_training(WARMING if how == "lr_scheduler" else CONSTANT)
    assert max_rel_err(loop["params"], want) < 1e-6


def test_without_accumulation_every_backward_is_a_step():
    model = TinyNet()
    args = GRArguments(gr_lambda=LAMBDA, gr_r=0.1, gr_warmup_strategy="zero", gr_warmup_steps=1)
    regularizer = GradientRegularizer(model, args=args)
    data, forwards = DictDataset(ROWS), []
    for step in range(3):
        before = model.forward_calls
        regularizer.backward(lambda step=step: model(**data.batch(BATCH * step, BATCH))["loss"])
        forwards.append(model.forward_calls - before)
        model.zero_grad()
    assert forwards == [1, 2, 2] and regularizer.completed_steps == 3 == regularizer.warmup_step


def test_a_short_last_step_ends_where_told():
    """k = 3 with a last step of one micro-batch (`sync_gradients=True`): the count starts over after it."""
    model = TinyNet()
    args = GRArguments(gr_lambda=LAMBDA, gr_r=0.1, gr_warmup_strategy="none", gr_interval=2)
    regularizer = GradientRegularizer(model, args=args, gradient_accumulation_steps=3)
    data, forwards = DictDataset(ROWS), []
    for step, micro_batches in enumerate([3, 1, 3]):
        before = model.forward_calls
        for j in range(micro_batches):
            batch = data.batch(BATCH * (3 * step + j), BATCH)
            short = micro_batches == 1  # the loop knows it is the data's last micro-batch
            regularizer.backward(lambda batch=batch: model(**batch)["loss"], sync_gradients=True if short else None)
        forwards.append(model.forward_calls - before)
        model.zero_grad()
    assert forwards == [6, 1, 6] and regularizer.completed_steps == 3


# ---- bad input ----


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(gradient_accumulation_steps=0), ValueError, "gradient_accumulation_steps must be an integer >= 1"),
        (dict(gradient_accumulation_steps=2.0), ValueError, "gradient_accumulation_steps must be an integer"),
        (dict(gradient_accumulation_steps=True), ValueError, "gradient_accumulation_steps must be an integer"),
        (dict(warmup_steps=-1), ValueError, "warmup_steps must be an integer >= 0"),
        (dict(seed="0"), ValueError, "seed must be an integer"),
        (dict(args={"gr_lambda": 0.1}), TypeError, "args must be a GRArguments"),
        (dict(warmup_steps=5, args=GRArguments(gr_warmup_steps=3)), ValueError, "warmup_steps=5 contradicts"),
        (dict(lr_scheduler=object()), TypeError, "lr_scheduler must be a torch.optim.lr_scheduler.LRScheduler"),
        (dict(lr_scheduler="plateau"), TypeError, "got ReduceLROnPlateau"),
        (dict(lr_scheduler="step"), ValueError, "cannot be read from StepLR: set gr_warmup_steps"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedulers = {"plateau": torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer),
                  "step": torch.optim.lr_scheduler.StepLR(optimizer, 2)}  # fmt: skip
    if isinstance(kwargs.get("lr_scheduler"), str):
        kwargs = {**kwargs, "lr_scheduler": schedulers[kwargs["lr_scheduler"]]}
    kwargs.setdefault("args", GRArguments(gr_warmup_strategy="zero"))
    with pytest.raises(error, match=match):
        GradientRegularizer(model, **kwargs)


def test_contradicting_the_accelerator_is_refused():
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = accelerator.prepare(TinyNet())
    with pytest.raises(ValueError, match="gradient_accumulation_steps=3 contradicts the accelerator's"):
        GradientRegularizer(model, accelerator, gradient_accumulation_steps=3)
    no_warmup = GRArguments(gr_warmup_strategy="none")
    regularizer = GradientRegularizer(model, accelerator, no_warmup, gradient_accumulation_steps=2)  # the same: fine
    batch = DictDataset(8).batch(0, 8)
    with accelerator.accumulate(model), pytest.raises(ValueError, match="sync_gradients=True contradicts"):
        regularizer.backward(lambda: model(**batch)["loss"], sync_gradients=True)  # the first of 2 micro-batches
    with pytest.raises(TypeError, match="sync_gradients must be True, False or None"):
        GradientRegularizer(TinyNet(), args=no_warmup).backward(lambda: torch.zeros(()), sync_gradients=1)


def test_public_surface():
    public = {name for name in dir(GradientRegularizer) if not name.startswith("_")}
    assert public == {"backward", "completed_steps", "load_state_dict", "state_dict", "warmup_step"}
    regularizer = GradientRegularizer(TinyNet(), args=GRArguments(gr_warmup_strategy="none"))
    with pytest.raises(AttributeError):
        regularizer.completed_steps = 3


# ---- two processes (torchrun, gloo) ----


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plain_loop_distributed")
    out = tmp / "results.pt"
    return run_torchrun(SCRIPT, out, tmp)


@pytest.mark.parametrize("setting, synced", [("ddp", False), ("fsdp2", True)])
def test_distributed_plain_loop_takes_the_trainers_gr_steps(distributed_results, setting, synced):
    assert distributed_results["world_size"] == 2
    loop, trainer = distributed_results[setting]["loop"], distributed_results[setting]["trainer"]
    assert trainer["forwards"] == loop["forwards"] == FORWARDS  # per replica
    assert loop["completed"] == list(range(1, STEPS + 1))
    want = reference_training(CONSTANT, world=2, synced=synced)
    assert max_rel_err(loop["params"], want) < 1e-6
    assert max_rel_err(trainer["params"], want) < 1e-6

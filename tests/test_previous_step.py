"""One-pass SAM (`gr_ascent_direction="previous_step"`): ε = r·D/‖D‖ with D the gradient the optimizer applied at
the last step, against a float64 SGD (lr 1) simulation written here from that definition."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from hf_gr import GradientRegularizer, GRArguments
from hf_gr._internal import previous, schedule

from gpu_check_lib import count_host_syncs
from gr_testing import DictDataset, SequentialGRTrainer, TinyNet, make_args, max_rel_err, params_of, run_torchrun
from killed_run import resumable_args

BATCH, R = 8, 0.1


def _grad(net, params: dict, batch: dict) -> list[torch.Tensor]:
    """∇L at `params` in float64 (`net`, a float64 TinyNet, only gives the function)."""
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    out = functional_call(net, leaves, args=(), kwargs={"x": batch["x"].double()})
    loss = torch.nn.functional.cross_entropy(out["logits"], batch["labels"])
    return list(torch.autograd.grad(loss, list(leaves.values())))


def _along(params: dict, direction: list[torch.Tensor]) -> dict:
    norm = torch.sqrt(sum((d**2).sum() for d in direction))
    return {n: p + R / norm * d for (n, p), d in zip(params.items(), direction)}


def reference(data, kinds: list[str], accumulation: int = 1, trail: list | None = None, forget: int | None = None,
              clip: float = 0.0):  # fmt: skip
    """SGD at lr 1 in float64: a GR step steps along D, the previous step's applied gradient (two passes, along its
    own g1, when there is no D yet, or at step `forget`, where D is dropped); a plain step takes g. The update is
    clipped to global norm `clip` (> 0, torch's rule), and D ← the applied update after every step. Returns the
    final parameters and the forward passes each step took."""
    model = TinyNet().double()  # the trainer's initial weights, in float64
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    previous, passes = None, []
    for step, kind in enumerate(kinds):
        update, forwards = None, 0
        previous = None if step == forget else previous
        for j in range(accumulation):
            batch = data.batch((step * accumulation + j) * BATCH, BATCH)
            if kind == "plain":
                g, forwards = _grad(model, params, batch), forwards + 1
            elif kind.startswith("alpha="):  # α_t < 1 (a λ-warmup): the two-pass step, (1 − α)·g1 + α·g2
                alpha, g1 = float(kind[6:]), _grad(model, params, batch)
                g2 = _grad(model, _along(params, g1), batch)
                g, forwards = [(1 - alpha) * a + alpha * b for a, b in zip(g1, g2)], forwards + 2
            elif previous is None:  # no D: this micro-batch's own g1 gives the direction
                g, forwards = _grad(model, _along(params, _grad(model, params, batch)), batch), forwards + 2
            else:
                g, forwards = _grad(model, _along(params, previous), batch), forwards + 1
            g = [x / accumulation for x in g]
            update = g if update is None else [a + b for a, b in zip(update, g)]
        if clip > 0:
            norm = float(torch.sqrt(sum((u**2).sum() for u in update)))
            assert norm > clip  # the test's clipping bites
            update = [u * min(1.0, clip / (norm + 1e-6)) for u in update]
        params = {n: p - u for (n, p), u in zip(params.items(), update)}
        previous = update
        if trail is not None:
            trail.append(dict(params))
        passes.append(forwards)
    return list(params.values()), passes


def _args(tmp_path, **overrides):
    defaults = dict(max_steps=4, per_device_train_batch_size=BATCH, optim="sgd", learning_rate=1.0,
                    lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, gr_lambda=R,
                    gr_r=R, gr_ascent_direction="previous_step")  # fmt: skip
    defaults.update(overrides)
    return make_args(tmp_path, **defaults)


class _Counting(SequentialGRTrainer):
    """Counts the forward passes of each optimizer step (`counted`)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        before = model.forward_calls
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.step_forwards = getattr(self, "step_forwards", 0) + model.forward_calls - before
        if self.accelerator.sync_gradients:
            self.counted.append(self.step_forwards)
            self.step_forwards = 0
        return loss


def _drawn(p: float, p_end: float, steps: int) -> list[str]:
    """The GR steps `gr_probability` p draws (seed 0), its p_t ramped linearly from step 0 to p_end at the last."""
    kinds = ["gr" if schedule.uniform(0, t) < p + (p_end - p) * t / (steps - 1) else "plain" for t in range(steps)]
    assert "plain" in kinds and "plain" in kinds[:-1] and "gr" in kinds  # a plain step's gradient becomes D
    return kinds


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize(
    "overrides, kinds",
    [({}, ["gr"] * 4),
     ({"gr_warmup_strategy": "zero", "gr_warmup_steps": 2}, ["plain", "plain", "gr", "gr"]),
     ({"gr_interval": 2}, ["gr", "plain", "gr", "plain"]),
     ({"gr_probability": 0.5, "max_steps": 6}, _drawn(0.5, 0.5, 6)),
     ({"gr_probability": 0.3, "gr_probability_end": 1.0, "max_steps": 6}, _drawn(0.3, 1.0, 6)),
     ({"max_grad_norm": 0.05, "gr_diagnostics_steps": 1}, ["gr"] * 4),
     ({"gr_warmup_strategy": "lambda", "gr_warmup_steps": 2}, ["plain", "alpha=0.5", "gr", "gr"])],
    ids=["every-step", "zero-warmup", "interval-2", "probability-0.5", "probability-ramp", "clipped-diagnosed",
         "lambda-warmup"],
)  # fmt: skip
def test_training_steps_along_the_previous_applied_gradient(tmp_path, accumulation, overrides, kinds):
    model, data = TinyNet(), DictDataset(96)
    args = _args(tmp_path, gradient_accumulation_steps=accumulation, **overrides)
    trainer = _Counting(model=model, args=args, train_dataset=data)
    trainer.counted = []
    trainer.train()
    want, passes = reference(data, kinds, accumulation, clip=overrides.get("max_grad_norm", 0.0))
    assert trainer.counted == passes  # one pass per micro-batch once a D exists; two only before it
    assert max_rel_err(params_of(model), [w.float() for w in want]) < 1e-5
    # gr_sharpness needs L(θ), which a one-pass step does not compute: logged only for two-pass GR steps
    sharp = [e["step"] for e in trainer.state.log_history if "gr_sharpness" in e]
    assert sharp == [i + 1 for i, (kind, n) in enumerate(zip(kinds, passes)) if kind != "plain" and n > accumulation]


def test_evaluation_between_steps_sees_theta_not_the_perturbed_point(tmp_path):
    """Evaluated after every step, the model is at θ: its eval loss is the float64 reference's at θ."""
    model, data, held_out = TinyNet(), DictDataset(96), DictDataset(32, seed=1)
    args = _args(tmp_path, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=32)
    trainer = SequentialGRTrainer(model=model, args=args, train_dataset=data, eval_dataset=held_out)
    trainer.train()
    trail = []
    reference(data, ["gr"] * 4, trail=trail)
    net = TinyNet().double()
    batch = held_out.batch(0, 32)
    want = [float(torch.nn.functional.cross_entropy(
        functional_call(net, params, args=(), kwargs={"x": batch["x"].double()})["logits"], batch["labels"]))
        for params in trail]  # fmt: skip
    got = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert got == pytest.approx(want, rel=1e-5)


def test_one_pass_sam_is_not_batch_sam(tmp_path):
    """The check above could not tell the two modes apart if D were the batch's own g1: the updates differ."""
    model, data = TinyNet(), DictDataset(96)
    trainer = SequentialGRTrainer(model=model, args=_args(tmp_path, gr_ascent_direction="batch"), train_dataset=data)
    trainer.train()
    want, _ = reference(data, ["gr"] * 4)
    assert max_rel_err(params_of(model), [w.float() for w in want]) > 1e-3


def test_custom_loop_reads_d_at_the_optimizer_step():
    model, data = TinyNet(), DictDataset(96)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    args = GRArguments(gr_lambda=R, gr_r=R, gr_warmup_strategy="none", gr_ascent_direction="previous_step")
    regularizer = GradientRegularizer(model, args=args, gradient_accumulation_steps=2, optimizer=optimizer)
    forwards = []
    for step in range(3):
        before = model.forward_calls
        for j in range(2):
            batch = data.batch((2 * step + j) * BATCH, BATCH)
            regularizer.backward(lambda batch=batch: model(**batch)["loss"] / 2)
        optimizer.step()
        optimizer.zero_grad()
        forwards.append(model.forward_calls - before)
    want, passes = reference(data, ["gr"] * 3, accumulation=2)
    assert forwards == passes == [4, 2, 2]
    assert max_rel_err(params_of(model), [w.float() for w in want]) < 1e-5


def test_resume_is_bit_identical(tmp_path):
    data = DictDataset(96)
    straight = TinyNet()
    SequentialGRTrainer(model=straight, args=_args(tmp_path / "a"), train_dataset=data).train()
    first = TinyNet()
    args = _args(tmp_path / "b", max_steps=2, save_strategy="steps", save_steps=2)
    SequentialGRTrainer(model=first, args=args, train_dataset=data).train()
    resumed = TinyNet()
    args = _args(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2)
    trainer = SequentialGRTrainer(model=resumed, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=True)
    assert all(torch.equal(a, b) for a, b in zip(params_of(resumed), params_of(straight)))


def test_a_resume_from_a_checkpoint_without_d_takes_two_passes_then_one(tmp_path):
    """A checkpoint written before D was saved (its GR state lacks it): the first resumed GR step runs the two-pass
    step on its batch, the next steps along that step's gradient, as the reference that drops D at step 2 does."""
    data = DictDataset(96)
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    SequentialGRTrainer(model=TinyNet(), args=args, train_dataset=data).train()
    state_file = tmp_path / "out" / "checkpoint-2" / "gr_state.pt"
    state = torch.load(state_file, weights_only=False)
    assert "gr_previous_direction" in state  # what the resume below goes without
    torch.save({k: v for k, v in state.items() if k != "gr_previous_direction"}, state_file)
    resumed = TinyNet()
    trainer = _Counting(model=resumed, args=_args(tmp_path, save_strategy="steps", save_steps=2), train_dataset=data)
    trainer.counted = []
    trainer.train(resume_from_checkpoint=True)
    want, passes = reference(data, ["gr"] * 4, forget=2)
    assert trainer.counted == passes[2:] == [2, 1]
    assert max_rel_err(params_of(resumed), [w.float() for w in want]) < 1e-5


@pytest.mark.slow  # a subprocess
def test_a_run_killed_mid_step_resumes_bit_identically(tmp_path):
    """SIGKILL in step 5, between its micro-batches with θ perturbed; the resume from checkpoint-4 (which holds D)
    takes one pass per micro-batch and ends on the uninterrupted run's weights, bit for bit."""
    data = DictDataset(96)
    straight = TinyNet()
    SequentialGRTrainer(model=straight, args=resumable_args(tmp_path / "straight"), train_dataset=data).train()
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "killed_run.py"), str(killed), "5"],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert sorted(p.name for p in (killed / "out").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    resumed = TinyNet(seed=1)  # other initial weights: all of θ must come from the checkpoint
    trainer = _Counting(model=resumed, args=resumable_args(killed), train_dataset=data)
    trainer.counted = []
    trainer.train(resume_from_checkpoint=True)
    assert trainer.counted == [2, 2]  # steps 5 and 6 along the checkpoint's D: one pass per micro-batch
    assert all(torch.equal(a, b) for a, b in zip(params_of(resumed), params_of(straight)))


@pytest.mark.parametrize(
    "overrides, message",
    [(dict(gr_lambda=0.05), "needs α = 1"), (dict(gr_ascent_fraction=0.5), "gr_ascent_fraction=0.5 < 1"),
     (dict(gr_reuse=True, gr_interval=2), "gr_reuse"), (dict(gr_method="exact"), "gr_method='exact'"),
     (dict(gr_ascent_direction="sideways"), "gr_ascent_direction must be one of batch, previous_step")],
)  # fmt: skip
def test_what_one_pass_cannot_do_is_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **overrides)


def test_a_custom_loop_without_its_optimizer_is_refused():
    args = GRArguments(gr_lambda=R, gr_r=R, gr_warmup_strategy="none", gr_ascent_direction="previous_step")
    with pytest.raises(ValueError, match="pass optimizer="):
        GradientRegularizer(TinyNet(), args=args)


# ---- two processes (torchrun, gloo) ----


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("previous_step") / "results.pt"
    return run_torchrun(Path(__file__).parent / "distributed" / "previous_step_runs.py", out)


@pytest.mark.parametrize("setting", ["ddp", "fsdp2"])
def test_distributed_one_pass_sam_equals_the_single_process_reference(distributed_results, setting):
    """The replicas' D is the all-reduced applied gradient: every rank perturbs alike, and the run equals one process
    on both replicas' rows (step 0 plain, then one pass per micro-batch)."""
    run = distributed_results[setting]
    want, passes = reference(DictDataset(96), ["plain", "gr", "gr", "gr"], accumulation=2)
    assert run["forwards"] == passes == [2, 2, 2, 2]
    assert run["same_d"] is (True if setting == "ddp" else None)  # DDP: every replica perturbs alike
    assert max_rel_err(run["params"], [w.float() for w in want]) < 1e-5


def test_ddp_one_pass_sam_all_reduces_once_per_step(distributed_results):
    """One bucket through DDP's comm hook per step, as plain training, and no other collective (all-reduce,
    all-gather, broadcast, ...) of hf_gr's own."""
    assert distributed_results["ddp"]["all_reduces"] == [1, 1, 1, 1]
    assert distributed_results["ddp"]["other_all_reduces"] == [0, 0, 0, 0]


def test_fsdp2_keeps_d_sharded_like_the_gradients(distributed_results):
    sizes = distributed_results["fsdp2"]["sizes"]
    assert sizes["d"] == sizes["local"] < sizes["full"]


def test_after_a_step_the_fp16_scaler_skipped_a_gr_step_takes_two_passes():
    """A plain PyTorch loop with a GradScaler: step 1's loss is infinite, the scaler skips the optimizer's step, so no
    D comes from it and step 2 runs two passes; step 3 steps along step 2's gradient again."""
    _, forwards, _, scaler = _inf_at_step_1(lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    assert scaler.get_scale() == 512.0  # one step skipped
    assert forwards == [2, 1, 2, 1]


def _inf_at_step_1(optimizer, steps: int = 4, save_after: int | None = None):
    """A loop with a GradScaler whose step 1 overflows; forwards per step, and the regularizer's state after
    `save_after` (what a checkpoint would hold)."""
    model, data = TinyNet(), DictDataset(96)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    args = GRArguments(gr_lambda=R, gr_r=R, gr_warmup_strategy="none", gr_ascent_direction="previous_step")
    opt = optimizer(model)
    regularizer = GradientRegularizer(model, args=args, optimizer=opt)
    forwards, saved = [], None
    for step in range(steps):
        batch, before = data.batch(step * BATCH, BATCH), model.forward_calls
        factor = float("inf") if step == 1 else 1.0
        regularizer.backward(lambda batch=batch, factor=factor: scaler.scale(model(**batch)["loss"] * factor))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        forwards.append(model.forward_calls - before)
        if step == save_after:
            saved = regularizer.state_dict()
    return model, forwards, saved, scaler


def test_a_fused_optimizers_skipped_step_leaves_no_nan_direction():
    """A fused AdamW steps even on an overflow (the kernel skips the update), so its hook sees the non-finite
    gradient: D is then 0, the next GR step a plain step, and training goes on finite."""
    model, forwards, _, _ = _inf_at_step_1(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True))
    assert forwards == [2, 1, 1, 1]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_checkpoint_after_a_skipped_step_holds_no_direction():
    """Resumed from it, the next GR step runs two passes, as the uninterrupted run does."""
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    _, _, after_skip, _ = _inf_at_step_1(sgd, steps=2, save_after=1)
    _, _, after_step, _ = _inf_at_step_1(sgd, steps=1, save_after=0)
    assert "gr_previous_direction" not in after_skip and "gr_previous_direction" in after_step


def test_a_new_attachment_starts_without_a_direction():
    """Another `train()` or `hyperparameter_search` trial: new parameters, new optimizer, no D from before."""
    direction = previous.PreviousDirection()
    first = TinyNet()
    direction.attach(torch.optim.SGD(first.parameters(), lr=0.1), list(first.parameters()))
    for p in first.parameters():
        p.grad = torch.ones_like(p)
    direction.capture_(list(first.parameters()))
    assert direction.ready
    second = TinyNet()
    optimizer = torch.optim.SGD(second.parameters(), lr=0.1)
    direction.attach(optimizer, list(second.parameters()))
    assert not direction.ready
    for p in second.parameters():
        p.grad = torch.full_like(p, 2.0)
    optimizer.step()  # the hook captures the new parameters' gradients (no KeyError on the old ids)
    assert direction.ready and bool((direction.flat == 2.0).all())


def test_a_one_pass_step_and_its_capture_read_nothing_back_to_the_host():
    model, data = TinyNet(), DictDataset(96)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = GRArguments(gr_lambda=R, gr_r=R, gr_warmup_strategy="none", gr_ascent_direction="previous_step")
    regularizer = GradientRegularizer(model, args=args, optimizer=optimizer)
    for step in range(2):  # step 0 (two passes, no D) sets D; step 1 warms the one-pass path up
        regularizer.backward(lambda step=step: model(**data.batch(step * BATCH, BATCH))["loss"])
        optimizer.step()
        optimizer.zero_grad()
    with count_host_syncs() as counts:
        regularizer.backward(lambda: model(**data.batch(2 * BATCH, BATCH))["loss"])
        optimizer.step()  # the hook copies D and checks it is finite, on the device
        optimizer.zero_grad()
    assert counts["n"] == 0 and model.forward_calls == 2 + 1 + 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_entry_sets_d_to_zero(bad):
    """One NaN or ±inf anywhere in the applied gradient: D is 0 (the next GR step is a plain step), not θ + NaN."""
    params = [torch.nn.Parameter(torch.randn(50)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(50)
    direction = previous.PreviousDirection()
    direction.attach(torch.optim.SGD(params, lr=0.1), params)
    direction.capture_(params)
    assert torch.equal(direction.flat, torch.cat([p.grad for p in params]))  # a finite gradient is D as it is
    params[1].grad[7] = bad
    direction.capture_(params)
    assert direction.ready and torch.equal(direction.flat, torch.zeros(150))


@pytest.mark.parametrize("modes", [dict(gr_ascent_direction="previous_step"), dict(gr_reuse=True, gr_interval=2)])
def test_parameters_on_several_devices_are_refused_before_the_first_step(modes):
    """A model split over devices (`device_map`): the flat buffer D or u would live on one of them; refused when
    the regularizer is built, naming the options, instead of failing inside a step."""
    model = TinyNet()
    model.extra = torch.nn.Linear(2, 2, device="meta")  # a second device
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = GRArguments(gr_lambda=R, gr_r=R, gr_warmup_strategy="none", **modes)
    with pytest.raises(ValueError, match=r"parameters are on cpu, meta \(a device_map over several devices\)"):
        GradientRegularizer(model, args=args, optimizer=optimizer)
    del model.extra
    GradientRegularizer(model, args=args, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))  # one device: fine


def test_a_trainer_with_model_init_captures_d_of_the_model_each_train_builds(tmp_path):
    """With `model_init` every `train()` (each `hyperparameter_search` trial) builds a new model: D is read from its
    parameters, not those of the model the trainer was made with; both runs equal the reference."""
    data = DictDataset(96)
    trainer = _Counting(model_init=lambda trial=None: TinyNet(), args=_args(tmp_path), train_dataset=data)
    want, passes = reference(data, ["gr"] * 4)
    for run in range(2):
        trainer.counted = []
        trainer.train()
        assert trainer.counted == passes, run
        assert max_rel_err(params_of(trainer.model), [w.float() for w in want]) < 1e-5, run


def test_a_rank_without_trainable_elements_captures_an_empty_d():
    """An FSDP2 rank can hold empty shards of every trainable parameter: D is empty, and capturing it works."""
    params = [torch.nn.Parameter(torch.empty(0)), torch.nn.Parameter(torch.empty(0, 3))]
    for p in params:
        p.grad = torch.zeros_like(p)
    direction = previous.PreviousDirection()
    optimizer = torch.optim.SGD(params, lr=0.1)
    direction.attach(optimizer, params)
    optimizer.step()
    assert direction.ready and direction.flat.numel() == 0


class _SyncCounting(SequentialGRTrainer):
    """Counts host reads inside each `training_step` (the GR passes) of a Trainer run."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        with count_host_syncs() as counts:
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.reads.append(counts["n"])
        return loss


def test_the_trainers_one_pass_steps_read_nothing_back_to_the_host(tmp_path):
    """In the Trainer too (logging every 2 steps, so that a step between logs is seen): a one-pass step's
    `training_step` reads no value back; the first, two-pass step is allowed its set-up."""
    trainer = _SyncCounting(model=TinyNet(), args=_args(tmp_path, logging_steps=2), train_dataset=DictDataset(96))
    trainer.reads = []
    trainer.train()
    assert len(trainer.reads) == 4 and trainer.reads[1:] == [0, 0, 0]

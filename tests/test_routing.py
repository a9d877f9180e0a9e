"""GR when a parameter is in only one pass's graph: routing that the perturbation flips.

The GR gradient is (1 − α)·g1 + α·g2 with a gradient missing from a pass counted as 0 (plus what earlier
micro-batches accumulated). `RoutedNet` routes to expert 0 while `gate > 0` and its loss pulls `gate` so hard that
ε = r·g1/‖g1‖ moves it below 0: expert 0 is only in pass 1's graph, expert 1 only in pass 2's, `unused` in neither.
Single process here; DDP (`GRTrainer`, `find_unused_parameters=True`) and FSDP2 under torchrun on CPU (gloo).
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel

from hf_gr import GradientRegularizer, GRArguments
from hf_gr._internal import sync

from gr_testing import DictDataset, free_port, max_rel_err, run_torchrun

SCRIPT = Path(__file__).parent / "distributed" / "routing_runs.py"
sys.path.insert(0, str(SCRIPT.parent))
from routing_runs import BATCH, LAMBDA, WORLD, R, RoutedNet  # noqa: E402

ONLY_PASS_1, ONLY_PASS_2, NEITHER = "experts.0.weight", "experts.1.weight", "unused.weight"


def _grads(model, params: dict, batch: dict) -> dict:
    """∇ of the model's loss at `params` by a fresh autograd pass; None for a parameter outside the graph."""
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    loss = functional_call(model, leaves, args=(), kwargs=batch)["loss"]
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))


def _zero(grads: dict, params: dict) -> dict:
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in grads.items()}


def reference_gr_grads(model, batches: list[list[dict]], alpha: float, synced: bool = False) -> dict:
    """The mean over replicas (inner lists) of (1 − α)·g1 + α·g2, summed over micro-batches (outer list) and
    divided by their number; missing gradients are 0. `synced`: ε along the replicas' mean g1."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for replicas in batches:
        g1s = [_grads(model, params, b) for b in replicas]
        for g1 in g1s:  # the routing flips: expert 0 only in pass 1, expert 1 only in pass 2
            assert g1[ONLY_PASS_1] is not None and g1[ONLY_PASS_2] is None and g1[NEITHER] is None
        g1s = [_zero(g, params) for g in g1s]
        mean_g1 = {n: sum(g[n] for g in g1s) / len(g1s) for n in params}
        for b, g1 in zip(replicas, g1s):
            direction = mean_g1 if synced else g1
            norm = torch.sqrt(sum((d.double() ** 2).sum() for d in direction.values()))
            shifted = {n: p + (R / norm).to(p.dtype) * direction[n] for n, p in params.items()}
            g2 = _grads(model, shifted, b)
            assert g2[ONLY_PASS_1] is None and g2[ONLY_PASS_2] is not None
            g2 = _zero(g2, params)
            for n in params:
                total[n] += ((1 - alpha) * g1[n] + alpha * g2[n]) / (len(replicas) * len(batches))
    return total


def _err(got: dict, want: dict, names=None) -> float:
    """The relative error over `names` (default: all), a missing gradient as 0; the absolute one where `want` is 0
    (inf where a gradient is missing that `want` has)."""
    names = list(want) if names is None else names
    if any(got[n] is None and want[n].any() for n in names):
        return float("inf")
    values = [torch.zeros_like(want[n]) if got[n] is None else got[n] for n in names]
    if all(not want[n].any() for n in names):  # e.g. expert 0 at α = 1: (1 − α)·g1 = 0
        return float(torch.sqrt(sum((v.double() ** 2).sum() for v in values)))
    return max_rel_err(values, [want[n] for n in names])


# ---- single process ----


@pytest.mark.parametrize("diagnostics", [False, True])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_single_process_gr_counts_a_missing_gradient_as_zero(accumulation, alpha, diagnostics):
    model, data = RoutedNet(), DictDataset(48)
    arguments = GRArguments(gr_lambda=alpha * R, gr_r=R, gr_warmup_strategy="none")
    regularizer = GradientRegularizer(model, args=arguments, gradient_accumulation_steps=accumulation)
    if diagnostics:  # the measuring path keeps g1 even at α = 1
        regularizer.metrics = lambda key, value: None
    batches = [data.batch(BATCH * i, BATCH) for i in range(accumulation)]
    for batch in batches:
        regularizer.backward(lambda batch=batch: model(**batch)["loss"] / accumulation)
    got = {n: p.grad for n, p in model.named_parameters()}
    want = reference_gr_grads(model, [[b] for b in batches], alpha)
    assert got[NEITHER] is None and got["unused.bias"] is None  # as in plain training
    for name in (ONLY_PASS_1, ONLY_PASS_2):
        assert _err(got, want, [name]) < 1e-6, name  # raw g2 for expert 1 was 2× too large at α = 0.5
    assert _err(got, want) < 1e-6


# ---- DDP and FSDP2 (torchrun, 2 processes, gloo) ----


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing")
    out = tmp / "results.pt"
    return run_torchrun(SCRIPT, out, tmp, nproc=WORLD)


def _replica_batches(accumulation: int) -> list[list[dict]]:
    """Micro-batch m of replica r is batch m·WORLD + r (the sequential sampler's order, sharded)."""
    data = DictDataset(48)
    return [[data.batch((m * WORLD + r) * BATCH, BATCH) for r in range(WORLD)] for m in range(accumulation)]


@pytest.mark.parametrize("run_name, accumulation, alpha", [("ddp_ga1", 1, LAMBDA / R), ("ddp_ga2", 2, LAMBDA / R),
                                                           ("ddp_sam", 1, 1.0)])  # fmt: skip
def test_ddp_gr_counts_a_missing_gradient_as_zero(routed, run_name, accumulation, alpha):
    run = routed[run_name]
    assert run["find_unused_parameters"]
    (got,) = run["grads"]
    want = reference_gr_grads(RoutedNet(), _replica_batches(accumulation), alpha)
    assert got[NEITHER] is None
    assert _err(got, want) < 1e-6
    assert _err(got, want, [ONLY_PASS_1]) < 1e-6 and _err(got, want, [ONLY_PASS_2]) < 1e-6


@pytest.mark.parametrize("run_name, accumulation, synced", [("ddp_data_ga1", 1, False), ("ddp_data_ga2", 2, False),
                                                            ("ddp_data_sync", 1, True)])  # fmt: skip
def test_ddp_gr_with_a_layer_only_some_replicas_use(routed, run_name, accumulation, synced):
    """`deep` is in one replica's graphs only (a data-dependent early exit), besides the flipping experts."""
    batches = _replica_batches(accumulation)
    assert all([float(b["x"].sum()) > 0 for b in replicas].count(True) == 1 for replicas in batches)
    (got,) = routed[run_name]["grads"]
    want = reference_gr_grads(RoutedNet(exit_by_data=True), batches, LAMBDA / R, synced=synced)
    assert got[NEITHER] is None
    assert _err(got, want) < 1e-6
    for name in ("deep.weight", ONLY_PASS_1, ONLY_PASS_2):
        assert _err(got, want, [name]) < 1e-6, name


def test_ddp_without_find_unused_parameters_is_a_clear_error(routed):
    """DDP would otherwise leave a bucket unreduced and fail only at the next step ("Expected to have finished
    reduction in the prior iteration"), after a step whose gradients were not all averaged."""
    message = routed["ddp_used_only_error"]
    assert "GR's perturbation changed which parameters the model uses" in message
    assert "ddp_find_unused_parameters=True" in message


def test_ddp_synced_perturbation_leaves_unused_parameters_without_gradient(routed):
    """AdamW with weight decay: a layer no replica uses keeps `.grad = None` and does not move, as in plain
    training; step 1's gradient is the reference with ε along the replicas' mean g1."""
    run = routed["ddp_sync"]
    assert len(run["grads"]) == 3
    assert all(step[NEITHER] is None and step["unused.bias"] is None for step in run["grads"])
    assert torch.equal(run["final"][NEITHER], run["initial"][NEITHER])
    assert not torch.equal(run["final"][ONLY_PASS_1], run["initial"][ONLY_PASS_1])  # the others did move
    want = reference_gr_grads(RoutedNet(), _replica_batches(1), LAMBDA / R, synced=True)
    assert _err(run["grads"][0], want) < 1e-6
    first, second = run["final_per_rank"]
    assert all(torch.equal(first[n], second[n]) for n in first)  # the replicas stay identical


@pytest.mark.parametrize("run_name, accumulation, alpha", [("fsdp2_ga1", 1, 0.5), ("fsdp2_ga2", 2, 0.5),
                                                           ("fsdp2_ga1_sam", 1, 1.0)])  # fmt: skip
def test_fsdp2_gr_counts_a_missing_gradient_as_zero(routed, run_name, accumulation, alpha):
    got = routed[run_name]  # FSDP2 reduce-scatters g1: ε is along the replicas' mean g1
    want = reference_gr_grads(RoutedNet(), _replica_batches(accumulation), alpha, synced=True)
    assert got[NEITHER] is None
    assert _err(got, want) < 1e-6
    assert _err(got, want, [ONLY_PASS_1]) < 1e-6 and _err(got, want, [ONLY_PASS_2]) < 1e-6


@pytest.mark.parametrize("find_unused", [True, False])
def test_a_compiled_ddp_model_is_recognised_as_ddp(find_unused, monkeypatch):
    """accelerate compiles over DDP (`torch.compile(DDP(model))`): GR must still see DDP's `find_unused_parameters`
    (it decides how a parameter in only one pass's graph gets its gradient), not a plain module."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(torch.nn.Linear(2, 2), find_unused_parameters=find_unused)
        compiled = torch.compile(ddp, backend="eager")
        assert compiled is not ddp and not isinstance(compiled, DistributedDataParallel)
        assert sync.finds_unused_parameters(compiled) is find_unused
        assert sync.reduces_only_used_parameters(compiled) is not find_unused
        assert not sync.finds_unused_parameters(torch.compile(torch.nn.Linear(2, 2), backend="eager"))
    finally:
        dist.destroy_process_group()

"""GR over real DDP processes (torchrun, gloo) against single-process references, and collective counts."""

from pathlib import Path

import pytest
import torch

from hf_gr import GRTrainer

from gr_testing import (
    DictDataset,
    TinyNet,
    grad_at,
    make_args,
    max_rel_err,
    reference_gr_grad,
    reference_reuse_direction,
    run_torchrun,
)

WORLD, BATCH, STEPS, LR, LAMBDA, R = 2, 4, 3, 0.5, 0.05, 0.1
SCRIPT = Path(__file__).parent / "distributed" / "ddp_gr_runs.py"


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "results.pt"
    return run_torchrun(SCRIPT, out, tmp, nproc=WORLD, timeout=300)


def _reference(
    accumulation: int,
    sync_perturbation: bool,
    zero_rank: int | None = None,
    kinds: list[str] | None = None,
    skipped: tuple[int, ...] = (),
) -> list[torch.Tensor]:
    """One process replaying the shards: rank r reads batches r, r + 2, ...; SGD on the replica-mean update.

    `zero_rank`: that rank's loss is 0·L, so it contributes a zero gradient. `kinds`: each step's kind ("gr",
    "plain" or "reuse", LookSAM's u and ρ from the replica-mean g1 and g_GR); `skipped`: steps that do not update.
    """
    model, data = TinyNet(), DictDataset(48)
    batches_per_epoch = len(data) // BATCH
    kinds = kinds or ["gr"] * STEPS
    u, rho = None, 0.0
    for step, kind in enumerate(kinds):
        update, plain_sum = None, None
        for j in range(accumulation):
            micro = step * accumulation + j
            batches = [data.batch(((micro * WORLD + r) % batches_per_epoch) * BATCH, BATCH) for r in range(WORLD)]
            if kind != "gr":
                params = {n: p.detach() for n, p in model.named_parameters()}
                grads = [[x / (WORLD * accumulation) for x in grad_at(model, params, b)] for b in batches]
                for g in grads:
                    update = g if update is None else [a + b for a, b in zip(update, g)]
                continue
            override = None
            if sync_perturbation:
                params = {n: p.detach() for n, p in model.named_parameters()}
                g1s = [grad_at(model, params, b) for b in batches]
                override = [sum(gs) / WORLD for gs in zip(*g1s)]
            for rank, b in enumerate(batches):
                g = reference_gr_grad(model, b, LAMBDA, R, g1_override=override)
                if rank == zero_rank:
                    g = [torch.zeros_like(x) for x in g]
                scaled = [x / (WORLD * accumulation) for x in g]
                update = scaled if update is None else [a + x for a, x in zip(update, scaled)]
                params = {n: p.detach() for n, p in model.named_parameters()}
                g1 = [x / (WORLD * accumulation) for x in grad_at(model, params, b)]
                plain_sum = g1 if plain_sum is None else [a + x for a, x in zip(plain_sum, g1)]
        if kind == "gr" and plain_sum is not None:
            u, rho = reference_reuse_direction(update, plain_sum)
        if kind == "reuse" and u is not None:
            norm = torch.sqrt(sum((x.double() ** 2).sum() for x in update))
            update = [x + (rho * norm * d.view_as(x)).to(x.dtype) for x, d in zip(update, u)]
        if step in skipped:
            continue
        with torch.no_grad():
            for p, x in zip(model.parameters(), update):
                p -= LR * x
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("run, accumulation, sync", [("gr_ga1", 1, False), ("gr_ga2", 2, False), ("gr_sync", 1, True)])
def test_ddp_gr_matches_single_process_reference(ddp_results, run, accumulation, sync):
    assert ddp_results["world_size"] == WORLD
    assert max_rel_err(ddp_results[run]["params"], _reference(accumulation, sync)) < 1e-6


def test_a_replica_without_gradient_direction_still_syncs(ddp_results):
    assert ddp_results["gr_zero_on_rank1"]["collectives"] == [(1, 1)] * STEPS  # no hang, one all-reduce per step
    assert max_rel_err(ddp_results["gr_zero_on_rank1"]["params"], _reference(1, False, zero_rank=1)) < 1e-6


def test_diagnostics_are_replica_averaged(ddp_results):
    """Step 1's ‖g1‖, ‖g2‖ and cos(g1, g2), each replica's own at the initial parameters, averaged over replicas."""
    model, data = TinyNet(), DictDataset(48)
    params = {n: p.detach() for n, p in model.named_parameters()}
    per_rank = []
    for rank in range(WORLD):  # step 1: rank r's batch r at the initial parameters
        batch = data.batch(rank * BATCH, BATCH)
        g1 = grad_at(model, params, batch)
        n1 = torch.sqrt(sum((g**2).sum() for g in g1))
        g2 = grad_at(model, {n: p + R / n1 * g for (n, p), g in zip(params.items(), g1)}, batch)
        n2 = torch.sqrt(sum((g**2).sum() for g in g2))
        cosine = sum((a * b).sum() for a, b in zip(g1, g2)) / (n1 * n2)
        per_rank.append([float(n1), float(n2), float(cosine)])
    want = torch.tensor(per_rank).mean(0).tolist()
    (entry,) = [e for e in ddp_results["gr_diagnostics"]["log_history"] if e.get("step") == 1 and "gr_grad_norm" in e]
    got = [entry["gr_grad_norm"], entry["gr_perturbed_grad_norm"], entry["gr_cosine"]]
    assert got == pytest.approx(want, rel=1e-5)
    assert per_rank[0][0] != pytest.approx(per_rank[1][0], rel=1e-3)  # the replicas differ: the mean is a real average


def test_synced_perturbation_differs_from_per_replica(ddp_results):
    assert max_rel_err(ddp_results["gr_sync"]["params"], ddp_results["gr_ga1"]["params"]) > 1e-6


def test_gr_step_costs_the_gradient_all_reduces_of_a_plain_step(ddp_results):
    # (gradient all-reduces seen by the DDP comm hook, all dist.all_reduce calls) per optimizer step
    plain = ddp_results["plain"]["collectives"]
    assert plain == [(1, 1)] * STEPS
    assert ddp_results["gr_ga1"]["collectives"] == plain
    assert ddp_results["gr_ga2"]["collectives"] == plain  # the non-final micro-batch stays local
    assert ddp_results["gr_sync"]["collectives"] == [(1, 2)] * STEPS  # exactly one more: the g1 average


def _kinds(pairs) -> list[str]:
    return ["gr" if g else "reuse" if r else "plain" for g, r in pairs]


@pytest.mark.parametrize("run, accumulation", [("gr_p05", 1), ("gr_reuse", 1), ("gr_reuse_ga2", 2)])
def test_cheaper_modes_take_the_same_steps_on_every_replica_and_match_the_reference(ddp_results, run, accumulation):
    result = ddp_results[run]
    rank0, rank1 = (_kinds(k) for k in result["kinds_per_rank"])
    assert rank0 == rank1 and len(rank0) == 6  # the draw is the same on both replicas
    assert "gr" in rank0 and set(rank0) - {"gr"}  # a mix of GR steps and cheaper ones
    assert max_rel_err(result["params"], _reference(accumulation, False, kinds=rank0)) < 1e-5
    # all-reduces per step: a GR step with reuse adds one (the replica-mean g1 for u); reuse steps add none
    plain = (1, 1)
    for kind, counts in zip(rank0, result["collectives"]):
        assert counts == ((1, 2) if kind == "gr" and "reuse" in run else plain), (kind, counts)


def test_a_non_finite_gradient_on_one_replica_skips_the_step_on_both(ddp_results):
    result = ddp_results["gr_inf_on_rank1"]
    assert result["collectives"] == [(1, 1)] * STEPS  # no hang, no extra collective
    assert result["scale"] == 512.0 and result["scheduler_steps"] == STEPS - 1  # one skip: scale halved, LR held
    assert max_rel_err(result["params"], _reference(1, False, skipped=(1,))) < 1e-6


def test_exact_method_refused_with_several_processes(ddp_results):
    assert "gr_method='exact'" in ddp_results["exact_error"] and "finite_difference" in ddp_results["exact_error"]


@pytest.mark.parametrize(
    "flag, message, alternative",
    [("is_deepspeed_enabled", "DeepSpeed", "DDP"), ("is_fsdp_enabled", "FSDP1", "fsdp_version: 2")],
)
def test_unsupported_distributed_modes_are_refused_at_start_up(tmp_path, monkeypatch, flag, message, alternative):
    original = GRTrainer.create_accelerator_and_postprocess

    def pretend(self):
        original(self)
        setattr(self, flag, True)

    monkeypatch.setattr(GRTrainer, "create_accelerator_and_postprocess", pretend)
    with pytest.raises(ValueError, match=message) as err:
        GRTrainer(model=TinyNet(), args=make_args(tmp_path))
    assert alternative in str(err.value)  # names the alternative


@pytest.mark.parametrize(
    "name, kind, processes, machines",
    [
        ("single_gpu", "NO", 1, 1),
        ("multi_gpu", "MULTI_GPU", 4, 1),
        ("multi_node", "MULTI_GPU", 16, 2),
        ("fsdp2", "FSDP", 8, 1),
    ],
)
def test_accelerate_launch_configs_parse(name, kind, processes, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).parents[1] / "configs" / "accelerate" / f"{name}.yaml"))
    assert (config.distributed_type.name, config.num_processes, config.num_machines) == (kind, processes, machines)
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2


def test_fsdp2_through_accelerate_is_accepted(tmp_path, monkeypatch):
    original = GRTrainer.create_accelerator_and_postprocess

    def pretend(self):
        original(self)
        self.is_fsdp_enabled = True
        monkeypatch.setattr(type(self.accelerator), "is_fsdp2", property(lambda _: True))

    monkeypatch.setattr(GRTrainer, "create_accelerator_and_postprocess", pretend)
    GRTrainer(model=TinyNet(), args=make_args(tmp_path))  # no error: the FSDP2 step is supported


@pytest.mark.parametrize(
    "run, line",
    [("gr_ga1", "GR: DDP over 2 processes, perturbation per replica (each replica's own g1)."),
     ("gr_sync", "GR: DDP over 2 processes, perturbation synced (the replica-mean g1, gr_sync_perturbation).")],
)  # fmt: skip
def test_train_start_says_ddp_and_where_the_perturbation_comes_from(ddp_results, run, line):
    assert [entry for entry in ddp_results[run]["gr_log"] if entry.startswith("GR: ")] == [line]


def test_fsdp_asked_for_on_cpu_warns_that_the_run_is_ddp(ddp_results):
    (warning,) = ddp_results["fsdp_on_cpu_log"]
    assert warning.startswith("FSDP was asked for (fsdp in the arguments) but the run is DDP over 2 processes")

"""GR under FSDP2 over real processes (torchrun, gloo): against single-process references, with collectives counted."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from gr_testing import max_rel_err, reference_reuse_direction, run_torchrun

WORLD, BATCH, STEPS, LR, R = 2, 4, 3, 0.5, 0.1
SCRIPT = Path(__file__).parent / "distributed" / "fsdp2_gr_runs.py"
sys.path.insert(0, str(SCRIPT.parent))
from fsdp2_gr_runs import TinyMLP, TokenRows, mlp_data  # noqa: E402


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp2")
    llama = tmp / "llama"
    _tiny_llama().save_pretrained(llama)
    out = tmp / "results.pt"
    return run_torchrun(SCRIPT, out, llama, tmp, nproc=WORLD), llama


def _gr_grad(model, params: dict, loss_fn, alpha: float) -> list[torch.Tensor]:
    """(1 − α)·g1 + α·g2 with ε = r·g1/‖g1‖ on the full global batch (what FSDP2's reduce-scattered g1 is)."""

    def grad(at):
        leaves = {n: p.detach().clone().requires_grad_(True) for n, p in at.items()}
        return list(torch.autograd.grad(loss_fn(lambda **kw: functional_call(model, leaves, args=(), kwargs=kw)),
                                        list(leaves.values())))  # fmt: skip

    g1 = grad(params)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in g1))
    g2 = grad({n: p + (R / norm).to(p.dtype) * g for (n, p), g in zip(params.items(), g1)})
    return [(1 - alpha) * a + alpha * b for a, b in zip(g1, g2)]


def _mlp_reference(accumulation: int, alpha: float, kind: str = "gr", kinds: tuple = ()) -> dict:
    """SGD on the full global micro-batches; `kinds` per step, reuse steps with LookSAM's u and ρ (full batch)."""
    model = TinyMLP()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = mlp_data(STEPS * accumulation)
    u, rho = None, 0.0
    for step in range(STEPS):
        step_kind = kinds[step] if kinds else kind
        update, plain = None, None
        for j in range(accumulation):
            micro = step * accumulation + j

            def loss_fn(forward, micro=micro):
                return F.mse_loss(forward(x=x[micro]), y[micro]) / accumulation

            g = _gr_grad(model, params, loss_fn, alpha if step_kind == "gr" else 0.0)
            g1 = _gr_grad(model, params, loss_fn, 0.0)
            update = g if update is None else [a + b for a, b in zip(update, g)]
            plain = g1 if plain is None else [a + b for a, b in zip(plain, g1)]
        if step_kind == "gr":
            u, rho = reference_reuse_direction(update, plain)
        elif step_kind == "reuse":
            norm = torch.sqrt(sum((v.double() ** 2).sum() for v in update))
            update = [v + (rho * norm * d.view_as(v)).to(v.dtype) for v, d in zip(update, u)]
        params = {n: p - LR * v for (n, p), v in zip(params.items(), update)}
    return params


def _err(got: dict, want: dict) -> float:
    return max_rel_err([got[n] for n in want], list(want.values()))


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_fsdp_gr_matches_the_full_batch_reference(fsdp_results, accumulation, alpha):
    results, _ = fsdp_results
    run = results[f"gr_ga{accumulation}_a{alpha}"]
    assert _err(run["params"], _mlp_reference(accumulation, alpha)) < 1e-6
    assert _err(run["params"], _mlp_reference(accumulation, alpha, kind="plain")) > 1e-3  # GR did something


def test_fsdp_reuse_matches_the_reference(fsdp_results):
    results, _ = fsdp_results
    want = _mlp_reference(2, 1.0, kinds=("gr", "reuse", "reuse"))
    assert _err(results["gr_reuse_ga2"]["params"], want) < 1e-6
    assert _err(results["gr_reuse_ga2"]["params"], _mlp_reference(2, 1.0, kinds=("gr", "plain", "plain"))) > 1e-4


def test_fsdp_plain_matches_the_plain_reference(fsdp_results):
    results, _ = fsdp_results
    assert _err(results["plain_ga2"]["params"], _mlp_reference(2, 0.0, kind="plain")) < 1e-6


def test_fsdp_uneven_and_empty_shards_restored_bit_exactly_on_every_rank(fsdp_results):
    results, _ = fsdp_results
    assert results["empty_shard_on_rank1"] is True  # head.weight has one row: rank 1's shard is empty
    for per_rank in results["restored_per_rank"]:
        assert all(ok for name, ok in per_rank.items() if ok is not None), per_rank


def test_fsdp_collectives_against_plain_fsdp(fsdp_results):
    """Per optimizer step: GR doubles the all-gathers, reduce-scatters every micro-batch twice (plain FSDP2 with
    accumulation reduce-scatters only on the last), and adds one scalar all-reduce per GR micro-batch."""
    results, _ = fsdp_results
    groups = 4  # fc1, fc2, head and the root
    for accumulation in (1, 2):
        plain = results[f"plain_ga{accumulation}"]["counts"][1:]  # step 0 includes FSDP's lazy initialization
        gr = results[f"gr_ga{accumulation}_a0.5"]["counts"][1:]
        for p, g in zip(plain, gr):
            assert p.get("reduce_scatter_single") == groups
            assert g.get("reduce_scatter_single") == 2 * groups * accumulation
            assert g.get("all_gather_single") == 2 * p.get("all_gather_single")
            assert g.get("all_reduce", 0) - p.get("all_reduce", 0) == accumulation


def test_fsdp_bf16_mixed_precision(fsdp_results):
    results, _ = fsdp_results
    gr, plain = results["gr_mixed"], results["plain_mixed"]
    assert all(t.dtype == torch.float32 for t in gr["params"].values())  # sharded parameters stay float32
    want = _mlp_reference(1, 1.0)
    assert _err(gr["params"], want) < 2e-2  # bf16 compute
    assert _err(gr["params"], want) < _err(plain["params"], want) / 3  # and closer to GR than plain training is


def test_fsdp_diagnostics_reduce_on_the_parameters_device(fsdp_results):
    """‖g1‖, ‖g2‖ and cos(g1, g2) of the full batch, summed over ranks on the parameters' device: an NCCL-only
    process group cannot all-reduce a CPU tensor. On CPU (gloo) the devices agree anyway, so the run also counts
    `Tensor.cpu` calls in the step: none."""
    results, _ = fsdp_results
    run = results["gr_diagnostics"]
    assert run["all_reduce_devices"] and set(run["all_reduce_devices"]) == {run["param_device"]}
    assert run["cpu_calls"] == 0
    model = TinyMLP()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = mlp_data(1)

    def grad(at):
        leaves = {n: p.clone().requires_grad_(True) for n, p in at.items()}
        loss = F.mse_loss(functional_call(model, leaves, args=(x[0],)), y[0])
        return torch.autograd.grad(loss, list(leaves.values()))

    g1 = grad(params)
    n1 = torch.sqrt(sum((g.double() ** 2).sum() for g in g1))
    g2 = grad({n: p + (R / n1).float() * g for (n, p), g in zip(params.items(), g1)})
    n2 = torch.sqrt(sum((g.double() ** 2).sum() for g in g2))
    cosine = sum((a.double() * b.double()).sum() for a, b in zip(g1, g2)) / (n1 * n2)
    got = run["metrics"]
    assert got["gr_grad_norm"] == pytest.approx([float(n1)], rel=1e-5)
    assert got["gr_perturbed_grad_norm"] == pytest.approx([float(n2)], rel=1e-5)
    assert got["gr_cosine"] == pytest.approx([float(cosine)], rel=1e-5)


def _llama_reference(path, accumulation: int, gr_lambda: float) -> dict:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = TokenRows()
    per_micro = WORLD * 2  # two rows per device and micro-batch
    for step in range(2):
        update = None
        for j in range(accumulation):
            micro = step * accumulation + j
            ids = torch.stack([rows[i]["input_ids"] for i in range(micro * per_micro, (micro + 1) * per_micro)])

            def loss_fn(forward, ids=ids):
                return forward(input_ids=ids, labels=ids).loss / accumulation

            g = _gr_grad(model, params, loss_fn, gr_lambda / R)
            update = g if update is None else [a + b for a, b in zip(update, g)]
        params = {n: p - LR * u for (n, p), u in zip(params.items(), update)}
    return params


@pytest.mark.parametrize("accumulation", [1, 2])
def test_grtrainer_under_fsdp2_matches_the_reference(fsdp_results, accumulation):
    """GRTrainer on the FSDP2 route transformers runs on CPU: `from_pretrained(distributed_config=...)`."""
    results, llama = fsdp_results
    run = results[f"trainer_gr_ga{accumulation}"]
    assert run["is_fsdp_managed"].startswith("FSDP")
    assert run["kinds"] == [1.0, 1.0]
    assert _err(run["params"], _llama_reference(llama, accumulation, 0.05)) < 1e-5
    assert _err(results["trainer_plain"]["params"], _llama_reference(llama, 1, 0.0)) < 1e-5
    assert "model.safetensors" in run["saved"]  # save_model gathers the full weights


def test_grtrainer_under_fsdp2_collectives(fsdp_results):
    results, _ = fsdp_results
    plain, gr = results["trainer_plain"]["counts"], results["trainer_gr_ga1"]["counts"]
    assert gr["reduce_scatter_single"] == 2 * plain["reduce_scatter_single"]
    assert gr["all_gather_single"] == 2 * plain["all_gather_single"]
    assert gr.get("all_reduce", 0) - plain.get("all_reduce", 0) == 2  # one scalar all-reduce per GR micro-batch


def test_grtrainer_under_fsdp2_says_so_at_train_start(fsdp_results):
    results, _ = fsdp_results
    assert [line for line in results["trainer_gr_ga1"]["gr_log"] if line.startswith("GR: ")] == [
        "GR: FSDP2 over 2 processes, perturbation synced (FSDP2 reduces g1 across replicas)."
    ]

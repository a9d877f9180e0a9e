"""Run under `torchrun --nproc_per_node 2`: GR under FSDP2 (`fully_shard`, gloo), with collectives counted.

Two set-ups, each written from rank 0 into a `torch.save` dict at argv[1]:
- `GRPasses` (the passes `GRTrainer` runs under FSDP2) on a small MLP sharded with `fully_shard`, with
  uneven and empty shards, accumulation 1 and 2, α = 0.5 and 1, and bf16 mixed precision;
- `GRTrainer` itself on the FSDP2 route transformers supports on CPU: a Llama loaded with
  `from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=2))` (argv[2] is the saved model).
"""

import collections
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.data import Dataset, SequentialSampler

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hf_gr import GRArguments, GRTrainer, GRTrainingArguments  # noqa: E402
from hf_gr._internal.passes import GRPasses  # noqa: E402
from hf_gr._internal.schedule import StepPlan  # noqa: E402

from gr_testing import GRLogLines, finish_distributed  # noqa: E402

WORLD, BATCH, STEPS, LR, R = 2, 4, 3, 0.5, 0.1
COLLECTIVES = ("all_gather_single", "reduce_scatter_single", "all_reduce")
COUNTS: collections.Counter = collections.Counter()


class TinyMLP(nn.Module):
    """fc1 (5×4): uneven shards 3/2; head (1×6) and its bias: empty on rank 1; `odd` (3,): 2/1."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 6)
        self.head = nn.Linear(6, 1)
        self.odd = nn.Parameter(torch.randn(3) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))).squeeze(-1) + self.odd.sum()


def mlp_data(micro_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of shape (micro_batches, WORLD·BATCH, ...): global micro-batch m; rank r takes rows r·B:(r+1)·B."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(micro_batches, WORLD * BATCH, 4, generator=g), torch.randn(
        micro_batches, WORLD * BATCH, generator=g
    )


def count_collectives() -> None:
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def counting(*args, __original=original, __name=name, **kwargs):
            COUNTS[__name] += 1
            return __original(*args, **kwargs)

        setattr(dist, name, counting)


def local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local()


def run_mlp(accumulation: int, alpha: float, kind: str = "gr", mixed: bool = False, kinds: tuple = ()) -> dict:
    rank = dist.get_rank()
    model = TinyMLP()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else None
    for module in (model.fc1, model.fc2, model.head):
        fully_shard(module, **({"mp_policy": policy} if mixed else {}))
    fully_shard(model, **({"mp_policy": policy} if mixed else {}))
    reuse = "reuse" in kinds
    arguments = GRArguments(gr_lambda=alpha * R, gr_r=R, gr_warmup_strategy="none", gr_reuse=reuse)
    passes = GRPasses(model, None, arguments)
    x, y = mlp_data(STEPS * accumulation)
    restored, counts = True, []
    for step in range(STEPS):
        COUNTS.clear()
        step_kind = kinds[step] if kinds else kind
        plan = StepPlan(step_kind, alpha * R if step_kind == "gr" else 0.0, R)
        passes.start_step()
        for j in range(accumulation):
            micro = step * accumulation + j
            rows = slice(rank * BATCH, (rank + 1) * BATCH)

            def run_pass(micro=micro, rows=rows):
                loss = F.mse_loss(model(x[micro, rows]).float(), y[micro, rows]) / accumulation
                loss.backward()
                return loss.detach()

            last = j == accumulation - 1
            before = [local(p).detach().clone() for p in model.parameters()]
            if step_kind == "plain":  # plain FSDP2 accumulation: reduce-scatter on the last micro-batch only
                model.set_requires_gradient_sync(last)
                run_pass()
                model.set_requires_gradient_sync(True)
            else:
                passes.run(run_pass, plan, last)
            restored &= all(torch.equal(a, local(p)) for a, p in zip(before, model.parameters()))
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
                p.grad = None
        counts.append(dict(COUNTS))
    return {
        "params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
        "restored": restored,
        "counts": counts,
        "empty_shard_on_rank1": local(model.head.weight).numel() == 0 if rank == 1 else None,
    }


def run_mlp_diagnostics() -> dict:
    """One GR step (α = 0.5) measuring the diagnostics: the values recorded, the devices of the tensors handed to
    `dist.all_reduce`, and the `Tensor.cpu` calls made during the step (none: the reduction stays on the device)."""
    rank = dist.get_rank()
    model = TinyMLP()
    for module in (model.fc1, model.fc2, model.head):
        fully_shard(module)
    fully_shard(model)
    passes = GRPasses(model, None, GRArguments(gr_lambda=0.5 * R, gr_r=R, gr_warmup_strategy="none"))
    recorded: dict = {}
    record = lambda key, value: recorded.setdefault(key, []).append(value)  # noqa: E731
    x, y = mlp_data(1)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)

    def run_pass():
        loss = F.mse_loss(model(x[0, rows]), y[0, rows])
        loss.backward()
        return loss.detach()

    devices, moved = [], [0]
    all_reduce, cpu = dist.all_reduce, torch.Tensor.cpu

    def watched_all_reduce(tensor, *args, **kwargs):
        devices.append(str(tensor.device))
        return all_reduce(tensor, *args, **kwargs)

    def watched_cpu(self, *args, **kwargs):
        moved[0] += 1
        return cpu(self, *args, **kwargs)

    passes.start_step()
    dist.all_reduce, torch.Tensor.cpu = watched_all_reduce, watched_cpu
    try:
        passes.run(run_pass, StepPlan("gr", 0.5 * R, R), True, record=record)
    finally:
        dist.all_reduce, torch.Tensor.cpu = all_reduce, cpu
    return {
        "metrics": {k: [float(v) for v in values] for k, values in recorded.items()},
        "all_reduce_devices": devices,
        "param_device": str(local(next(model.parameters())).device),
        "cpu_calls": moved[0],
    }


class TokenRows(Dataset):
    """Fixed-length rows (no padding): every rank's mean loss is the global mean, as in the reference."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        ids = (torch.arange(8) * (i + 3) + i) % 64
        return {"input_ids": ids, "labels": ids}


class SequentialTrainer(GRTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def run_trainer(path: str, accumulation: int, gr_lambda: float, tmp: str) -> dict:
    from transformers import LlamaForCausalLM
    from transformers.distributed import DistributedConfig

    model = LlamaForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(fsdp_size=WORLD))
    args = GRTrainingArguments(
        output_dir=os.path.join(tmp, f"llama_{accumulation}_{gr_lambda}"), use_cpu=True, report_to=[],
        save_strategy="no", disable_tqdm=True, max_steps=2, per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, gr_lambda=gr_lambda, gr_r=R, gr_warmup_strategy="none",
        logging_steps=1, seed=0,
    )  # fmt: skip
    trainer = SequentialTrainer(model=model, args=args, train_dataset=TokenRows())
    COUNTS.clear()
    with GRLogLines() as logged:
        trainer.train()
    counts = dict(COUNTS)
    trainer.save_model(os.path.join(args.output_dir, "final"))
    return {
        "params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
        "counts": counts,
        "saved": sorted(os.listdir(os.path.join(args.output_dir, "final"))) if dist.get_rank() == 0 else None,
        "is_fsdp_managed": type(model).__name__,
        "kinds": [e.get("gr_step_fraction") for e in trainer.state.log_history if "gr_step_fraction" in e],
        "gr_log": logged.lines,
    }


def main() -> None:
    out, llama, tmp = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    count_collectives()
    results = {"world_size": dist.get_world_size()}
    for accumulation in (1, 2):
        results[f"plain_ga{accumulation}"] = run_mlp(accumulation, 0.5, kind="plain")
        for alpha in (0.5, 1.0):
            results[f"gr_ga{accumulation}_a{alpha}"] = run_mlp(accumulation, alpha)
    results["gr_reuse_ga2"] = run_mlp(2, 1.0, kinds=("gr", "reuse", "reuse"))
    results["gr_mixed"] = run_mlp(1, 1.0, mixed=True)
    results["plain_mixed"] = run_mlp(1, 1.0, kind="plain", mixed=True)
    results["gr_diagnostics"] = run_mlp_diagnostics()
    for accumulation in (1, 2):
        results[f"trainer_gr_ga{accumulation}"] = run_trainer(llama, accumulation, 0.05, tmp)
    results["trainer_plain"] = run_trainer(llama, 1, 0.0, tmp)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {k: v.get("restored") for k, v in results.items() if isinstance(v, dict)})
    results["restored_per_rank"] = gathered
    empty = [None] * dist.get_world_size()
    dist.all_gather_object(empty, results["gr_ga1_a0.5"]["empty_shard_on_rank1"])
    results["empty_shard_on_rank1"] = empty[1]
    finish_distributed(results, out)


if __name__ == "__main__":
    main()

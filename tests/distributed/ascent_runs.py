"""Run under `torchrun --nproc_per_node 2`: sub-batch ascent (`gr_ascent_fraction`) and `gr_sharpness` over DDP and
FSDP2 (gloo).

Writes, from rank 0, a `torch.save` dict to argv[1] (argv[2] is a scratch folder):
- GRTrainer over DDP with f = 0.5: per-replica direction with accumulation 2, and the synced perturbation; the
  final parameters and the gradient all-reduces per optimizer step;
- GRTrainer over DDP with f = 1 and a log entry per step: every rank's logged `gr_sharpness`;
- `GRPasses` (the passes GRTrainer runs under FSDP2) on the small MLP sharded with `fully_shard`,
  pass 1 on the first half of each rank's rows, accumulation 2, α = 1.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from ddp_gr_runs import CountCollectives, _Path  # noqa: E402
from fsdp2_gr_runs import BATCH, LR, STEPS, R, TinyMLP, mlp_data  # noqa: E402

from hf_gr import GRArguments  # noqa: E402
from hf_gr._internal.passes import GRPasses  # noqa: E402
from hf_gr._internal.schedule import StepPlan  # noqa: E402

from gr_testing import DictDataset, SequentialGRTrainer, TinyNet, finish_distributed, make_args  # noqa: E402

DDP_RUNS = {
    "ascent_ga2": dict(gradient_accumulation_steps=2, gr_ascent_fraction=0.5),
    "ascent_sync": dict(gradient_accumulation_steps=1, gr_ascent_fraction=0.5, gr_sync_perturbation=True),
    "sharpness": dict(gradient_accumulation_steps=1, logging_strategy="steps", logging_steps=1),
}


def run_ddp(name: str, overrides: dict, tmp: str) -> dict:
    overrides.setdefault("logging_strategy", "no")
    args = make_args(
        _Path(tmp), output_dir=os.path.join(tmp, name), per_device_train_batch_size=4, optim="sgd",
        learning_rate=0.5, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, max_steps=3,
        gr_lambda=0.1, gr_r=0.1, **overrides,
    )  # fmt: skip
    model = TinyNet()
    trainer = SequentialGRTrainer(model=model, args=args, train_dataset=DictDataset(48))
    counter = CountCollectives(trainer)
    trainer.add_callback(counter)
    all_reduce = dist.all_reduce
    try:
        trainer.train()
    finally:
        dist.all_reduce = all_reduce
    sharpness = [e["gr_sharpness"] for e in trainer.state.log_history if "gr_sharpness" in e]
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, sharpness)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "collectives": counter.per_step,
        "sharpness_per_rank": every_rank,
    }


def run_fsdp_ascent(accumulation: int) -> dict:
    """α = 1 under FSDP2: pass 1 on the first BATCH // 2 of each rank's rows, pass 2 on all BATCH of them."""
    rank = dist.get_rank()
    model = TinyMLP()
    for module in (model.fc1, model.fc2, model.head):
        fully_shard(module)
    fully_shard(model)
    arguments = GRArguments(gr_lambda=R, gr_r=R, gr_warmup_strategy="none", gr_ascent_fraction=0.5)
    passes = GRPasses(model, None, arguments)
    x, y = mlp_data(STEPS * accumulation)
    plan = StepPlan("gr", R, R)
    restored = True
    for step in range(STEPS):
        passes.start_step()
        for j in range(accumulation):
            micro = step * accumulation + j
            rows = slice(rank * BATCH, (rank + 1) * BATCH)
            sub = slice(rank * BATCH, rank * BATCH + BATCH // 2)

            def run_pass(micro=micro, rows=rows):
                loss = F.mse_loss(model(x[micro, rows]), y[micro, rows]) / accumulation
                loss.backward()
                return loss.detach()

            def ascent_pass(micro=micro, sub=sub):
                loss = F.mse_loss(model(x[micro, sub]), y[micro, sub]) / accumulation
                loss.backward()
                return loss.detach()

            before = [p.to_local().detach().clone() for p in model.parameters()]
            passes.run(run_pass, plan, j == accumulation - 1, ascent_pass)
            restored &= all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
                p.grad = None
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, restored)
    return {"params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
            "restored_per_rank": every_rank}  # fmt: skip


def main() -> None:
    out, tmp = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {name: run_ddp(name, dict(overrides), tmp) for name, overrides in DDP_RUNS.items()}
    results["fsdp_ascent_ga2"] = run_fsdp_ascent(2)
    results["world_size"] = dist.get_world_size()
    finish_distributed(results, out)


if __name__ == "__main__":
    main()

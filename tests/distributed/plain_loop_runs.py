"""GR in a plain PyTorch loop (no Accelerate) with gradient accumulation, and the same run through `GRTrainer`.

Imported by `tests/test_plain_loop.py` (one process) and run under `torchrun --nproc_per_node 2` (gloo):
- a plain DDP loop (`DistributedDataParallel`, the first micro-batch under `model.no_sync()`) against `GRTrainer`
  under DDP;
- a plain FSDP2 loop (`fully_shard`, `set_requires_gradient_sync(False)` on the first micro-batch) against
  `GRTrainer` under DDP with `gr_sync_perturbation` (FSDP2 reduce-scatters g1, so its perturbation is the
  replicas' mean g1: the same GR gradient).
Rank r's micro-batch m is the data's batch m·world + r, as accelerate shards the Trainer's batches. Writes, from
rank 0, a `torch.save` dict to argv[1]: per setting, each run's final parameters and forwards per optimizer step.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback, get_constant_schedule_with_warmup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hf_gr import GradientRegularizer, GRArguments  # noqa: E402

from gr_testing import DictDataset, SequentialGRTrainer, TinyNet, make_args  # noqa: E402

BATCH, STEPS, ACCUMULATION, LR, LAMBDA, R, W, INTERVAL, ROWS = 4, 6, 2, 0.5, 0.05, 0.1, 2, 2, 96
# Zero-warmup over W = 2 optimizer steps, then GR every 2nd step: counted in micro-batches, it would differ.
GR_FIELDS = dict(gr_lambda=LAMBDA, gr_r=R, gr_warmup_strategy="zero", gr_warmup_steps=W, gr_interval=INTERVAL)


class ForwardsPerStep(TrainerCallback):
    """The model's forward passes in each optimizer step (2 per micro-batch on a GR step, 1 otherwise)."""

    def __init__(self, model: TinyNet) -> None:
        self.model, self.per_step, self.before = model, [], 0

    def on_step_begin(self, *args, **kwargs) -> None:
        self.before = self.model.forward_calls

    def on_step_end(self, *args, **kwargs) -> None:
        self.per_step.append(self.model.forward_calls - self.before)


def micro_batch(data: DictDataset, step: int, j: int, rank: int, world: int) -> dict:
    return data.batch(((step * ACCUMULATION + j) * world + rank) * BATCH, BATCH)


def trainer_run(tmp: str, lr_warmup: bool = False, **gr) -> dict:
    """`GRTrainer` on the same data: SGD, accumulation 2; `lr_warmup`: a constant LR after W warmup steps, with W
    taken from it (gr_warmup_steps unset)."""
    fields = {**GR_FIELDS, **gr}
    schedule = dict(lr_scheduler_type="constant")
    if lr_warmup:
        fields["gr_warmup_steps"] = None
        schedule = dict(lr_scheduler_type="constant_with_warmup", warmup_steps=W)
    args = make_args(Path(tmp), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION,
                     max_steps=STEPS, optim="sgd", learning_rate=LR, weight_decay=0.0, max_grad_norm=0.0,
                     logging_strategy="no", **schedule, **fields)  # fmt: skip
    model = TinyNet()
    forwards = ForwardsPerStep(model)
    SequentialGRTrainer(model=model, args=args, train_dataset=DictDataset(ROWS), callbacks=[forwards]).train()
    return {"params": [p.detach().clone() for p in model.parameters()], "forwards": forwards.per_step}


def plain_loop(model: nn.Module, module: TinyNet, how: str, rank: int = 0, world: int = 1, **gr) -> dict:
    """A plain PyTorch loop, accumulation 2, telling the regularizer where a step ends `how`:

    "gradient_accumulation_steps" (k = 2 at construction), "sync_gradients" (per `backward` call), or
    "lr_scheduler" (k = 2 and a constant LR after W warmup steps, W and t read from the scheduler).
    """
    fields = {**GR_FIELDS, **gr}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler, options = None, {}
    if how == "lr_scheduler":
        fields["gr_warmup_steps"] = None
        scheduler = get_constant_schedule_with_warmup(optimizer, W)
        options = dict(gradient_accumulation_steps=ACCUMULATION, lr_scheduler=scheduler)
    elif how == "gradient_accumulation_steps":
        options = dict(gradient_accumulation_steps=ACCUMULATION)
    regularizer = GradientRegularizer(model, args=GRArguments(**fields), **options)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    fsdp = hasattr(model, "set_requires_gradient_sync")
    data, forwards, completed = DictDataset(ROWS), [], []
    for step in range(STEPS):
        before = module.forward_calls
        for j in range(ACCUMULATION):
            batch = micro_batch(data, step, j, rank, world)
            last = j == ACCUMULATION - 1

            def loss_fn(batch=batch):
                return model(**batch)["loss"] / ACCUMULATION

            sync = dict(sync_gradients=last) if how == "sync_gradients" else {}
            if fsdp:
                model.set_requires_gradient_sync(last)
            if ddp and not last:
                with model.no_sync():
                    regularizer.backward(loss_fn, **sync)
            else:
                regularizer.backward(loss_fn, **sync)
        completed.append(regularizer.completed_steps)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad()
        forwards.append(module.forward_calls - before)
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return {"params": [p.detach().clone() for p in params], "forwards": forwards, "completed": completed,
            "warmup_step": regularizer.warmup_step}  # fmt: skip


def main() -> None:
    from torch.distributed.fsdp import fully_shard

    out, tmp = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"world_size": world}

    module = TinyNet()
    ddp = nn.parallel.DistributedDataParallel(module)
    results["ddp"] = {
        "loop": plain_loop(ddp, module, "gradient_accumulation_steps", rank, world),
        "trainer": trainer_run(os.path.join(tmp, "ddp")),
    }

    module = TinyNet()
    fully_shard(module.fc1)
    fully_shard(module.fc2)
    fully_shard(module)
    results["fsdp2"] = {
        "loop": plain_loop(module, module, "sync_gradients", rank, world),
        "trainer": trainer_run(os.path.join(tmp, "fsdp2"), gr_sync_perturbation=True),
    }
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

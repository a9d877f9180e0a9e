"""Run under `torchrun --nproc_per_node 2`: one-pass SAM (`gr_ascent_direction="previous_step"`) under DDP and FSDP2.

A plain PyTorch loop, accumulation 2, SGD at lr 1, zero-warmup over W = 1 (step 0 plain, so every GR step has a D),
4 steps; rank r's micro-batch m is rows ((step·2 + m)·2 + r)·4 to +4, so the replicas' mean gradient is the single
process's on 8 consecutive rows. Writes, from rank 0, a `torch.save` dict to argv[1]: per setting the final
parameters, the all-reduces per step (DDP: the comm hook's buckets, and any other collective called through
`torch.distributed`), whether every rank held the same D, and D's length against the rank's shards and the whole
model (FSDP2).
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hf_gr import GradientRegularizer, GRArguments  # noqa: E402

from gr_testing import DictDataset, TinyNet, finish_distributed  # noqa: E402

BATCH, STEPS, ACCUMULATION, R = 4, 4, 2, 0.1
IN_HOOK = [False]  # set while DDP's comm hook runs its own all-reduce
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "reduce",
               "all_to_all_single", "barrier")  # fmt: skip
FIELDS = dict(gr_lambda=R, gr_r=R, gr_warmup_strategy="zero", gr_warmup_steps=1, gr_ascent_direction="previous_step")


def loop(model: nn.Module, module: TinyNet, rank: int, world: int, counts: list[int] | None = None) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    regularizer = GradientRegularizer(model, args=GRArguments(**FIELDS), gradient_accumulation_steps=ACCUMULATION,
                                      optimizer=optimizer)  # fmt: skip
    fsdp = hasattr(model, "set_requires_gradient_sync")
    data, per_step, forwards, direct, other = DictDataset(96), [], [], [], []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(original):  # hf_gr's own collectives, beside the comm hook's buckets
        def counted(*args, **kwargs):
            if not IN_HOOK[0]:
                direct.append(1)
            return original(*args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(dist, name, counting(original))
    for step in range(STEPS):
        before_reduces, before = (sum(counts) if counts is not None else 0), module.forward_calls
        before_direct = len(direct)
        for j in range(ACCUMULATION):
            batch = data.batch(((step * ACCUMULATION + j) * world + rank) * BATCH, BATCH)
            last = j == ACCUMULATION - 1

            def loss_fn(batch=batch):
                return model(**batch)["loss"] / ACCUMULATION

            if fsdp:
                model.set_requires_gradient_sync(last)
            if not fsdp and not last:
                with model.no_sync():
                    regularizer.backward(loss_fn)
            else:
                regularizer.backward(loss_fn)
        optimizer.step()
        optimizer.zero_grad()
        per_step.append((sum(counts) if counts is not None else 0) - before_reduces)
        other.append(len(direct) - before_direct)
        forwards.append(module.forward_calls - before)
    for name, original in originals.items():
        setattr(dist, name, original)
    same_d = None  # under FSDP2 each rank holds its own shard of D
    if not fsdp:
        d = regularizer.passes.previous.flat.clone()
        every = [torch.zeros_like(d) for _ in range(world)]
        dist.all_gather(every, d)
        same_d = all(torch.equal(every[0], x) for x in every)
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    sizes = {"d": regularizer.passes.previous.flat.numel(), "local": local, "full": sum(p.numel() for p in params)}
    return {"params": [p.detach().clone() for p in params], "all_reduces": per_step, "other_all_reduces": other,
            "forwards": forwards, "same_d": same_d, "sizes": sizes}  # fmt: skip


def main() -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"world_size": world}

    module = TinyNet()
    ddp = nn.parallel.DistributedDataParallel(module)
    counts: list[int] = []

    def counted(state, bucket):
        counts.append(1)
        IN_HOOK[0] = True
        try:
            return default_hooks.allreduce_hook(None, bucket)
        finally:
            IN_HOOK[0] = False

    ddp.register_comm_hook(None, counted)
    results["ddp"] = loop(ddp, module, rank, world, counts)

    module = TinyNet()
    fully_shard(module.fc1)
    fully_shard(module.fc2)
    fully_shard(module)
    results["fsdp2"] = loop(module, module, rank, world)
    finish_distributed(results, sys.argv[1])


if __name__ == "__main__":
    main()

"""Run under `torchrun --nproc_per_node 2`: a custom Accelerate loop with `GradientRegularizer.backward` against
`GRTrainer` on the same data (same init, same shards, SGD), and `scripts/train_accelerate.py` under DDP.

Writes, from rank 0, a `torch.save` dict to argv[1]: for each setting, the Trainer's and the loop's final
parameters, the loop's forwards and its gradient all-reduces per optimizer step (a DDP communication hook); and,
from each rank r, the script's result to argv[1] + ".script_rank{r}".
"""

import os
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import GradientState
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader
from transformers import get_constant_schedule

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "..", "scripts"))
import train_accelerate  # noqa: E402

from hf_gr import GradientRegularizer, GRArguments  # noqa: E402

from gr_testing import DictDataset, SequentialGRTrainer, TinyNet, make_args  # noqa: E402

BATCH, STEPS, LR, LAMBDA, R = 4, 3, 0.5, 0.05, 0.1
SETTINGS = {
    "ga1": dict(accumulation=1),
    "ga2": dict(accumulation=2),
    "ga2_zero_warmup": dict(accumulation=2, gr_warmup_strategy="zero", gr_warmup_steps=1),
    "ga2_plain": dict(accumulation=2, gr_lambda=0.0),
    # The warmup's t read from a prepared scheduler (which steps once per process at each optimizer step).
    "ga2_zero_warmup_scheduler": dict(accumulation=2, gr_warmup_strategy="zero", gr_warmup_steps=2, scheduler=True),
}


class _Path(str):
    def __truediv__(self, other):
        return _Path(os.path.join(self, other))


def gr_fields(setting: dict) -> dict:
    return dict(gr_lambda=setting.get("gr_lambda", LAMBDA), gr_r=R,
                gr_warmup_strategy=setting.get("gr_warmup_strategy", "none"),
                gr_warmup_steps=setting.get("gr_warmup_steps"))  # fmt: skip


def trainer_run(name: str, setting: dict, tmp: str) -> list[torch.Tensor]:
    args = make_args(
        _Path(tmp), output_dir=os.path.join(tmp, name), per_device_train_batch_size=BATCH, optim="sgd",
        learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, max_steps=STEPS,
        gradient_accumulation_steps=setting["accumulation"], logging_strategy="no", **gr_fields(setting),
    )  # fmt: skip
    model = TinyNet()
    SequentialGRTrainer(model=model, args=args, train_dataset=DictDataset(48)).train()
    return [p.detach().clone() for p in model.parameters()]


def loop_run(setting: dict) -> dict:
    """The README's custom loop: `regularizer.backward(loss_fn)` in place of `accelerator.backward(loss)`."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=setting["accumulation"])
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    dataloader = DataLoader(DictDataset(48), batch_size=BATCH, shuffle=False)
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    scheduler = accelerator.prepare(get_constant_schedule(optimizer)) if setting.get("scheduler") else None
    regularizer = GradientRegularizer(model, accelerator, GRArguments(**gr_fields(setting)), lr_scheduler=scheduler)

    all_reduces = [0]
    model.register_comm_hook(None, lambda state, bucket: (all_reduces.append(all_reduces.pop() + 1),
                                                          default_hooks.allreduce_hook(None, bucket))[1])  # fmt: skip
    for batch in dataloader:
        with accelerator.accumulate(model):
            regularizer.backward(lambda: model(**batch)["loss"])  # noqa: B023 (called right away)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            all_reduces.append(0)
            if regularizer.completed_steps == STEPS:
                break
    module = accelerator.unwrap_model(model)
    return {
        "params": [p.detach().clone() for p in module.parameters()],
        "forwards": module.forward_calls,
        "all_reduces": all_reduces[:-1],
        "steps": regularizer.completed_steps,
    }


def main() -> None:
    out, tmp = sys.argv[1], sys.argv[2]
    results = {name: {"trainer": trainer_run(name, setting, tmp), **loop_run(setting)}
               for name, setting in SETTINGS.items()}  # fmt: skip
    results["world_size"] = dist.get_world_size()
    rank = dist.get_rank()
    if rank == 0:
        torch.save(results, out)
    GradientState._reset_state()
    # The example script, as `torchrun --nproc_per_node 2 scripts/train_accelerate.py` runs it (one epoch); it ends
    # the process group (`accelerator.end_training()`), so each rank writes its own result.
    torch.save(train_accelerate.main(["--epochs", "1"]), f"{out}.script_rank{rank}")
    # Everything is saved and the process group is closed: leave without running C++ destructors at interpreter
    # exit, where torch's gloo teardown can abort ("terminate called without an active exception") under load.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

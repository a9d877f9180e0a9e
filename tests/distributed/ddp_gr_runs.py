"""Run under `torchrun --nproc_per_node 2`: GR training runs over DDP (gloo), with collectives counted.

Writes, from rank 0, a `torch.save` dict to argv[1]: for each run, the final parameters and, per optimizer
step, the gradient all-reduces (counted by a DDP communication hook) and the other all-reduces.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from transformers import TrainerCallback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gr_testing import DictDataset, GRLogLines, SequentialGRTrainer, TinyNet, make_args  # noqa: E402

RUNS = {
    "plain": dict(gr_lambda=0.0, gradient_accumulation_steps=1),
    "gr_ga1": dict(gradient_accumulation_steps=1),
    "gr_ga2": dict(gradient_accumulation_steps=2),
    "gr_sync": dict(gradient_accumulation_steps=1, gr_sync_perturbation=True),
    # rank 1's loss is 0·L: its ‖g1‖ = 0 (no direction), rank 0 runs GR; both must still run pass 2 together
    "gr_zero_on_rank1": dict(gradient_accumulation_steps=1, compute_loss_func="zero_on_rank1"),
    "gr_diagnostics": dict(gradient_accumulation_steps=1, gr_diagnostics_steps=1, logging_steps=1),
    # the cheaper modes: both replicas must take the same GR steps; reuse steps communicate like plain steps
    "gr_p05": dict(
        gradient_accumulation_steps=1, gr_probability=0.5, max_steps=6, logging_strategy="steps", logging_steps=1
    ),
    "gr_reuse": dict(
        gradient_accumulation_steps=1,
        gr_interval=3,
        gr_reuse=True,
        max_steps=6,
        logging_strategy="steps",
        logging_steps=1,
    ),
    "gr_reuse_ga2": dict(
        gradient_accumulation_steps=2,
        gr_interval=3,
        gr_reuse=True,
        max_steps=6,
        logging_strategy="steps",
        logging_steps=1,
    ),
    # rank 1's loss is inf at step 1: the fp16 scaler (attached to the Trainer's own loop) skips it on both ranks
    "gr_inf_on_rank1": dict(gradient_accumulation_steps=1, compute_loss_func="inf_on_rank1_step1", scaler=True),
}


CALLS = {"n": 0}


def inf_on_rank1_step1(outputs, labels, num_items_in_batch=None):
    """Both passes of step 1 (micro-batch calls 3 and 4: two passes per GR step) are inf on rank 1."""
    CALLS["n"] += 1
    loss = torch.nn.functional.cross_entropy(outputs["logits"], labels, reduction="sum") / num_items_in_batch
    return loss * float("inf") if dist.get_rank() == 1 and CALLS["n"] in (3, 4) else loss


def zero_on_rank1(outputs, labels, num_items_in_batch=None):
    # The Trainer's convention for a compute_loss_func: sum over the global item count of the micro-batch.
    loss = torch.nn.functional.cross_entropy(outputs["logits"], labels, reduction="sum") / num_items_in_batch
    return loss * 0 if dist.get_rank() == 1 else loss


class CountCollectives(TrainerCallback):
    """Counts, per optimizer step, gradient all-reduces (DDP comm hook) and all `dist.all_reduce` calls."""

    def __init__(self, trainer):
        self.trainer, self.ddp, self.other, self.per_step = trainer, 0, 0, []
        original = dist.all_reduce

        def counting_all_reduce(*args, **kwargs):
            self.other += 1
            return original(*args, **kwargs)

        dist.all_reduce = counting_all_reduce

    def _hook(self, state, bucket):
        self.ddp += 1
        return default_hooks.allreduce_hook(None, bucket)

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.model_wrapped.register_comm_hook(state=None, hook=self._hook)

    def on_step_begin(self, args, state, control, **kwargs):
        self.ddp = self.other = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step.append((self.ddp, self.other))


LOSS_FUNCS = {"zero_on_rank1": zero_on_rank1, "inf_on_rank1_step1": inf_on_rank1_step1}


def run(name: str, overrides: dict, tmp: str) -> dict:
    loss_func = LOSS_FUNCS.get(overrides.pop("compute_loss_func", None))
    scaler = overrides.pop("scaler", False)
    overrides.setdefault("logging_strategy", "no")
    overrides.setdefault("max_steps", 3)
    CALLS["n"] = 0
    args = make_args(
        _Path(tmp), output_dir=os.path.join(tmp, name), per_device_train_batch_size=4, optim="sgd",
        learning_rate=0.5, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        gr_lambda=overrides.pop("gr_lambda", 0.05), gr_r=0.1, **overrides,
    )  # fmt: skip
    model = TinyNet()
    trainer = SequentialGRTrainer(model=model, args=args, train_dataset=DictDataset(48), compute_loss_func=loss_func)
    counter = CountCollectives(trainer)
    trainer.add_callback(counter)
    if scaler:  # accelerate makes no GradScaler on CPU; torch's CPU one drives the same scale/unscale/skip path
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    all_reduce = dist.all_reduce
    try:
        with GRLogLines() as logged:
            trainer.train()
    finally:
        dist.all_reduce = all_reduce
    kinds = [
        (e["gr_step_fraction"], e["gr_reuse_fraction"]) for e in trainer.state.log_history if "gr_step_fraction" in e
    ]
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, kinds)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "collectives": counter.per_step,
        "log_history": trainer.state.log_history,
        "kinds_per_rank": every_rank,
        "scheduler_steps": trainer.lr_scheduler.last_epoch,
        "scale": trainer.accelerator.scaler.get_scale() if scaler else None,
        "gr_log": logged.lines,
    }


class _Path(str):
    def __truediv__(self, other):
        return _Path(os.path.join(self, other))


def exact_mode_error(tmp: str) -> str:
    try:
        SequentialGRTrainer(model=TinyNet(), args=make_args(_Path(tmp), gr_method="exact"))
    except ValueError as err:
        return str(err)
    return ""


def fsdp_on_cpu_log(tmp: str) -> list[str]:
    """What GRTrainer logs when the arguments ask for FSDP on CPU, where accelerate runs DDP instead."""
    with GRLogLines() as logged:
        args = make_args(_Path(tmp), fsdp=True, fsdp_config={"fsdp_version": 2})
        SequentialGRTrainer(model=TinyNet(), args=args)
    return logged.lines


def main() -> None:
    out, tmp = sys.argv[1], sys.argv[2]
    results = {name: run(name, dict(overrides), tmp) for name, overrides in RUNS.items()}
    results["exact_error"] = exact_mode_error(tmp)
    results["world_size"] = dist.get_world_size()
    results["fsdp_on_cpu_log"] = fsdp_on_cpu_log(tmp)  # last: transformers sets ACCELERATE_USE_FSDP for the process
    if dist.get_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main()

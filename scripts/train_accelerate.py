#!/usr/bin/env python
"""Gradient regularization (GR) in your own Accelerate loop: a small MLP on scikit-learn's digits (offline, CPU).

    python scripts/train_accelerate.py
    accelerate launch scripts/train_accelerate.py --gr_warmup_strategy lambda --gradient_accumulation_steps 2
    torchrun --nproc_per_node 2 scripts/train_accelerate.py          # DDP on CPU (gloo)

The only change to a plain Accelerate loop is `regularizer.backward(loss_fn)` in place of
`accelerator.backward(loss)`. Every `GRArguments` field is a flag (`--gr_lambda`, `--gr_r`, `--gr_warmup_strategy`,
...); the GR warmup W defaults to the LR warmup, in optimizer steps.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import HfArgumentParser, get_linear_schedule_with_warmup

from hf_gr import GradientRegularizer, GRArguments


@dataclass
class LoopArguments:
    epochs: int = field(default=4, metadata={"help": "Passes over the 1,437 training digits."})
    batch_size: int = field(default=32, metadata={"help": "Per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW's peak learning rate."})
    warmup_steps: int = field(default=20, metadata={"help": "Linear LR warmup, in optimizer steps."})
    seed: int = field(default=0, metadata={"help": "Seed of the model init, the data order and dropout."})
    mixed_precision: str = field(default="no", metadata={"help": "Autocast.", "choices": ["no", "fp16", "bf16"]})
    cpu: bool = field(default=False, metadata={"help": "Train on the CPU even if a GPU is available."})
    checkpoint_dir: str | None = field(default=None, metadata={"help": "Save the state after each epoch here."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A saved state to continue from."})


def get_dataloaders(batch_size: int) -> tuple[DataLoader, DataLoader]:
    """Digits (8×8 images as 64 features in [0, 1]), split 1,437 train / 360 eval with a fixed permutation."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1437], order[1437:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True, drop_last=True),
        DataLoader(TensorDataset(x[test], y[test]), batch_size=128),
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and evaluate; returns the last eval accuracy, the optimizer steps taken and the last loss."""
    args, gr_args = HfArgumentParser((LoopArguments, GRArguments)).parse_args_into_dataclasses(argv)
    # Without a GPU say cpu=True: only then does accelerate run torchrun's processes as DDP (over gloo).
    accelerator = Accelerator(
        cpu=args.cpu or not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )
    set_seed(args.seed)

    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Dropout(0.1), nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    train_dataloader, eval_dataloader = get_dataloaders(args.batch_size)
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader
    )
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    # A prepared scheduler steps once per process at each optimizer step: lengths in optimizer steps × processes.
    n = accelerator.num_processes
    scheduler = get_linear_schedule_with_warmup(optimizer, args.warmup_steps * n, steps_per_epoch * args.epochs * n)
    scheduler = accelerator.prepare(scheduler)

    # GR: the regularizer wraps the backward pass. The warmup's t is the scheduler's step count and W its warmup
    # (unless --gr_warmup_steps is given), as in GRTrainer; its step counter is saved with the state.
    regularizer = GradientRegularizer(model, accelerator, gr_args, lr_scheduler=scheduler)
    accelerator.register_for_checkpointing(regularizer)
    first_epoch = 0
    if args.resume_from_checkpoint:
        accelerator.load_state(args.resume_from_checkpoint)
        first_epoch = regularizer.completed_steps // steps_per_epoch  # states are saved at epoch ends

    accuracy, loss = 0.0, torch.zeros(())
    for epoch in range(first_epoch, args.epochs):
        model.train()
        for x, y in train_dataloader:
            with accelerator.accumulate(model):
                # In place of `accelerator.backward(loss)`: the forward as a function, run twice on a GR step.
                loss = regularizer.backward(lambda: F.cross_entropy(model(x), y))  # noqa: B023 (called right away)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()

        model.eval()
        correct = total = 0
        for x, y in eval_dataloader:
            with torch.no_grad():
                predictions = model(x).argmax(-1)
            predictions, y = accelerator.gather_for_metrics((predictions, y))
            correct, total = correct + int((predictions == y).sum()), total + len(y)
        accuracy = correct / total
        step = regularizer.completed_steps
        accelerator.print(f"epoch {epoch}: loss {loss.item():.4f}, eval accuracy {accuracy:.3f}, optimizer steps "
                          f"{step}, warmup step {regularizer.warmup_step}")  # fmt: skip
        if args.checkpoint_dir:
            accelerator.save_state(os.path.join(args.checkpoint_dir, f"epoch_{epoch}"))

    accelerator.wait_for_everyone()  # no process ends the process group while another is still in a collective
    accelerator.end_training()
    return {"eval_accuracy": accuracy, "steps": regularizer.completed_steps, "last_loss": loss.item()}


if __name__ == "__main__":
    main()

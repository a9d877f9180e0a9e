"""A one-pass SAM run that SIGKILLs itself in the middle of a GR step (`python killed_run.py OUT_DIR KILL_STEP`).

It trains as `resumable_args` says and kills itself at the second micro-batch's forward pass of optimizer step
KILL_STEP, with θ perturbed to θ + r·D/‖D‖ and half of the step's gradient accumulated: nothing of that step may
reach the checkpoint a resume reads.
"""

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gr_testing import DictDataset, SequentialGRTrainer, TinyNet, make_args  # noqa: E402


def resumable_args(out_dir: Path):
    """Six SGD steps at lr 1 (batch 8, accumulation 2): one plain, then one-pass GR (λ = r = 0.1); a checkpoint every
    2 steps."""
    return make_args(out_dir, max_steps=6, per_device_train_batch_size=8, gradient_accumulation_steps=2, optim="sgd",
                     learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                     logging_steps=1, gr_lambda=0.1, gr_r=0.1, gr_ascent_direction="previous_step",
                     gr_warmup_strategy="zero", gr_warmup_steps=1, save_strategy="steps", save_steps=2)  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    out_dir, kill_step = Path(sys.argv[1]), int(sys.argv[2])
    model, data = TinyNet(), DictDataset(96)
    trainer = SequentialGRTrainer(model=model, args=resumable_args(out_dir), train_dataset=data)
    forwards = []

    def kill_mid_step(module, inputs):
        if trainer.state.global_step == kill_step - 1 and module.training:
            forwards.append(1)
            if len(forwards) == 2:  # the step's second micro-batch: θ + ε, and the first half's gradient in .grad
                assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
                os.kill(os.getpid(), signal.SIGKILL)

    model.register_forward_pre_hook(kill_mid_step)
    trainer.train()


if __name__ == "__main__":
    main()

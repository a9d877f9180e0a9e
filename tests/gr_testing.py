"""Small models, data and an independent GR-gradient reference shared by the tests."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import Dataset, SequentialSampler
from transformers import PretrainedConfig, TrainerCallback

from hf_gr import GRTrainer, GRTrainingArguments


class TinyNet(nn.Module):
    """x → tanh(fc1) → dropout → fc2: logits, and the cross-entropy loss when labels are given."""

    def __init__(self, in_dim: int = 6, hidden: int = 16, classes: int = 3, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, classes)
        self.config = PretrainedConfig()  # the Trainer reads model.config for label smoothing
        self.forward_calls = 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self.forward_calls += 1
        logits = self.fc2(self.drop(torch.tanh(self.fc1(x))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class DictDataset(Dataset):
    """Rows of {"x", "labels"} from a fixed random classification problem."""

    def __init__(self, n: int = 64, in_dim: int = 6, classes: int = 3, seed: int = 0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, in_dim, generator=g, dtype=dtype)
        w = torch.randn(in_dim, classes, generator=g, dtype=dtype)
        self.labels = (self.x @ w).argmax(-1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.labels[i]}

    def batch(self, start: int, size: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[start : start + size], "labels": self.labels[start : start + size]}


class SequentialGRTrainer(GRTrainer):
    """GRTrainer reading the data in order, so a reference can replay the same batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def make_args(tmp_path, **overrides) -> GRTrainingArguments:
    """Quiet CPU arguments: no saving, no reporting, GR warmup off unless asked."""
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        gr_warmup_strategy="none",
        per_device_train_batch_size=8,
        seed=0,
    )
    defaults.update(overrides)
    return GRTrainingArguments(**defaults)


def step_trainer(tmp_path, model: nn.Module, **overrides) -> GRTrainer:
    """A GRTrainer whose `training_step` can be called directly (outside `train()`), as the loop would."""
    trainer = GRTrainer(model=model, args=make_args(tmp_path, **overrides))
    trainer.current_gradient_accumulation_steps = overrides.get("gradient_accumulation_steps", 1)
    return trainer


def cross_entropy(out: dict, batch: dict) -> torch.Tensor:
    return F.cross_entropy(out["logits"], batch["labels"])


def grad_at(
    model: nn.Module, params: dict[str, torch.Tensor], batch: dict, loss_fn: Callable = cross_entropy, seed=None
) -> list[torch.Tensor]:
    """∇L at `params` (a name → tensor dict), with torch's RNG seeded before the forward when `seed` is given."""
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    if seed is not None:
        torch.manual_seed(seed)
    out = functional_call(model, leaves, args=(), kwargs={"x": batch["x"]})
    return list(torch.autograd.grad(loss_fn(out, batch), list(leaves.values())))


def reference_gr_grad(
    model: nn.Module,
    batch: dict,
    gr_lambda: float,
    gr_r: float,
    loss_fn: Callable = cross_entropy,
    seed=None,
    g1_override: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """(1 − α)·g1 + α·g2 computed from scratch (g1_override: perturb along another g1, e.g. the replica mean)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    g1 = grad_at(model, params, batch, loss_fn, seed)
    direction = g1 if g1_override is None else g1_override
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in direction))
    shifted = {n: p + (gr_r / norm).to(p.dtype) * d for (n, p), d in zip(params.items(), direction)}
    g2 = grad_at(model, shifted, batch, loss_fn, seed)
    alpha = gr_lambda / gr_r
    return [(1 - alpha) * a + alpha * b for a, b in zip(g1, g2)]


def exact_gr_grad(model: nn.Module, batch: dict, gr_lambda: float, loss_fn: Callable = cross_entropy):
    """∇L + λ·H∇L/‖∇L‖ by a Hessian-vector product (an oracle independent of `hf_gr._internal.gradient`)."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad}
    out = functional_call(model, params, args=(), kwargs={"x": batch["x"]})
    g = torch.autograd.grad(loss_fn(out, batch), list(params.values()), create_graph=True)
    norm = torch.sqrt(sum((x**2).sum() for x in g)).detach()
    unit = [x.detach() / norm for x in g]
    hv = torch.autograd.grad(g, list(params.values()), grad_outputs=unit)
    return [a.detach() + gr_lambda * b for a, b in zip(g, hv)]


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


class StepUpdates(TrainerCallback):
    """Records the parameters before and after each optimizer step: with plain SGD (no momentum, weight decay or
    clipping) at learning rate lr, (before − after)/lr is the gradient the step applied."""

    def __init__(self) -> None:
        self.before: list[list[torch.Tensor]] = []
        self.after: list[list[torch.Tensor]] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before.append(params_of(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after.append(params_of(model))

    def applied(self, lr: float) -> list[list[torch.Tensor]]:
        """The gradient each step applied."""
        return [[(b - a) / lr for a, b in zip(after, before)] for before, after in zip(self.before, self.after)]


def max_rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    num = torch.sqrt(sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(got, want)))
    den = torch.sqrt(sum((b.double() ** 2).sum() for b in want))
    return float(num / den)


def reference_reuse_direction(g_gr: list[torch.Tensor], g1: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """u and ρ written out in float64 from the definitions: c = g_GR − g1, c⊥ = c − (⟨c, g1⟩/‖g1‖²)·g1."""
    flat_gr = torch.cat([x.double().flatten() for x in g_gr])
    flat_g1 = torch.cat([x.double().flatten() for x in g1])
    c = flat_gr - flat_g1
    c_perp = c - (c @ flat_g1) / (flat_g1 @ flat_g1) * flat_g1
    u = c_perp / c_perp.norm()
    return list(torch.split(u, [x.numel() for x in g1])), float(c_perp.norm() / flat_g1.norm())


def free_port() -> int:
    """A free TCP port on the loopback, for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: Path, out: Path, *args: object, nproc: int = 2, timeout: int = 600) -> Any:
    """Run `script out *args` in `nproc` processes (torchrun, gloo, offline, one thread each) and load what it saved
    to `out`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(script), str(out), *map(str, args)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


def finish_distributed(results: dict, out: str) -> NoReturn:
    """End a torchrun script: rank 0 saves `results` to `out` (what `run_torchrun` loads), then all ranks close
    the process group and exit (the function does not return)."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without C++ destructors at interpreter exit, where torch's gloo teardown can abort under load.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class GRLogLines(logging.Handler):
    """Collects what `hf_gr.trainer` logs at INFO and above while in a `with` block (`.lines`)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self._logger = logging.getLogger("hf_gr.trainer")

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> GRLogLines:
        self._level = self._logger.level
        self._logger.setLevel(logging.INFO)
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)

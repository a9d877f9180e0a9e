"""Diagnostics that show when GR is harmful: gradient norms and the adaptive optimizer's statistics.

The paper's analysis (Zhao, Zhang & Hu, ICML 2024, §4): early in training GR shrinks the gradient norm
faster than plain training, Adam/RMSProp accumulate their second moments from these biased gradients, and the
variance of the per-element adaptive learning rate lr/(sqrt(v̂) + eps) grows while the LR warmup runs.
`GRDiagnosticsCallback` logs these quantities every N optimizer steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from accelerate.utils import reduce
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .callbacks import GRStepState

GRADIENT_KEYS = ("gr_grad_norm", "gr_perturbed_grad_norm", "gr_cosine")
ADAPTIVE_LR_KEYS = ("adaptive_lr_mean", "adaptive_lr_var", "adaptive_lr_max")


class SecondPassProbe:
    """Measures ‖g2‖ and cos(g1, g2) during GR's second backward, with one held copy of g1.

    Gradient hooks see each parameter's pass-2 gradient (α·g2, this replica's own, before accumulation and
    DDP's all-reduce), so the combined gradient in `.grad` is never disturbed.

    Args:
        step_state: where the measurements are added (sums over the step's micro-batches).
        params / grads: the parameters and their g1 (read before `.grad` is rescaled in place).
        norm: ‖g1‖ as the step computed it.
        alpha: the pass-2 loss scale α.
        scale: divides the raw norms (loss scale × accumulation normalization), so they describe one batch.
    """

    def __init__(
        self,
        step_state: GRStepState,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        norm: float,
        alpha: float,
        scale: float,
    ) -> None:
        self.step_state, self.norm, self.alpha, self.scale = step_state, norm, alpha, scale
        self.squared = torch.zeros((), dtype=torch.float64)
        self.dot = torch.zeros((), dtype=torch.float64)
        self.g1 = [g.detach().clone() for g in grads]
        self.handles = [p.register_hook(self._hook(g1)) for p, g1 in zip(params, self.g1)]

    def _hook(self, g1: torch.Tensor):
        def accumulate(grad: torch.Tensor) -> None:
            self.squared += grad.double().pow(2).sum().cpu()
            self.dot += (grad.double() * g1.double()).sum().cpu()

        return accumulate

    def close(self) -> None:
        """Remove the hooks, release g1 and add this micro-batch's ‖g1‖, ‖g2‖, cos(g1, g2) to the step state."""
        for handle in self.handles:
            handle.remove()
        self.g1 = []
        g2_norm = math.sqrt(float(self.squared)) / self.alpha
        cosine = float(self.dot) / self.alpha / (self.norm * g2_norm) if g2_norm > 0 and self.norm > 0 else 0.0
        record(self.step_state, zip(GRADIENT_KEYS, (self.norm / self.scale, g2_norm / self.scale, cosine)))


def record(step_state: GRStepState, values: Iterable[tuple[str, float]]) -> None:
    """Add one micro-batch's measurements to the step's (averaged at the step's end)."""
    for key, value in values:
        step_state.diagnostics.setdefault(key, []).append(value)


def adaptive_lr_stats(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Mean, variance and max over all elements of lr/(sqrt(v̂) + eps), from the optimizer's state.

    v̂ is Adam/AdamW's bias-corrected second moment (`exp_avg_sq`/(1 − β2^t)) or RMSProp's `square_avg`.
    Empty for optimizers without such state (SGD) or before the first step.
    """
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    total, total_sq, largest, count = 0.0, 0.0, -math.inf, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" in state and "step" in state:
                step = float(state["step"])
                v_hat = state["exp_avg_sq"].double() / (1 - group["betas"][1] ** step)
            elif "square_avg" in state:
                v_hat = state["square_avg"].double()
            else:
                continue
            rate = group["lr"] / (v_hat.sqrt() + group["eps"])
            total += float(rate.sum())
            total_sq += float(rate.pow(2).sum())
            largest = max(largest, float(rate.max()))
            count += rate.numel()
    if count == 0:
        return {}
    mean = total / count
    return {
        "adaptive_lr_mean": mean,
        "adaptive_lr_var": max(total_sq / count - mean**2, 0.0),
        "adaptive_lr_max": largest,
    }


class GRDiagnosticsCallback(TrainerCallback):
    """Logs, every `every` optimizer steps, the quantities behind the paper's "when is GR harmful" analysis.

    On GR steps: `gr_grad_norm` (‖g1‖), `gr_perturbed_grad_norm` (‖g2‖), `gr_cosine` (cos(g1, g2)), of the
    step's batch at the parameters it started from (averaged over micro-batches and replicas). On plain steps
    (λ = 0, zero-warmup): `gr_grad_norm` of the step's gradient (first micro-batch; replica-averaged under DDP).
    With Adam/AdamW/RMSProp: `adaptive_lr_mean`, `adaptive_lr_var`, `adaptive_lr_max` of lr/(sqrt(v̂) + eps)
    right after the step's update. The entry logged after step s describes step s. Off-diagnostic steps cost
    nothing; a diagnostic GR step holds one copy of g1.

    Args:
        every (`int`): log every this many optimizer steps.
    """

    def __init__(self, every: int) -> None:
        if every <= 0:
            raise ValueError(f"GRDiagnosticsCallback needs every >= 1, got {every}.")
        self.every = every
        self.step_state: GRStepState | None = None
        self._adaptive: dict[str, float] = {}

    def bind(self, step_state: GRStepState) -> None:
        """Give the callback the state the trainer reads and fills (done by `GRTrainer`)."""
        self.step_state = step_state

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.step_state is not None:
            self.step_state.record_diagnostics = (state.global_step + 1) % self.every == 0
        return control

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Right after optimizer.step() and before the scheduler moves the lr: the step's own learning rate.
        if self.step_state is not None and self.step_state.record_diagnostics and kwargs.get("optimizer"):
            self._adaptive = adaptive_lr_stats(kwargs["optimizer"])
        return control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.step_state is None or not self.step_state.record_diagnostics:
            return control
        self.step_state.record_diagnostics = False
        measured = self.step_state.diagnostics
        values = {key: sum(measured[key]) / len(measured[key]) for key in GRADIENT_KEYS if measured.get(key)}
        measured.clear()
        values.update(self._adaptive)
        self._adaptive = {}
        if args.world_size > 1:
            values = _replica_mean(values, args.device)
        measured.update(values)
        control.should_log = True  # the entry logged after this step carries the values
        return control


def _replica_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average each value over the replicas (every replica reports the same keys: all run the same steps)."""
    if not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    averaged = reduce(tensor, reduction="mean")
    return dict(zip(keys, averaged.tolist()))

"""Diagnostics that show when GR is harmful: gradient norms and the adaptive optimizer's statistics.

The paper's analysis (Zhao, Zhang & Hu, ICML 2024, §4): early in training GR shrinks the gradient norm
faster than plain training, Adam/RMSProp accumulate their second moments from these biased gradients, and the
variance of the per-element adaptive learning rate lr/(sqrt(v̂) + eps) grows while the LR warmup runs.
`GRDiagnosticsCallback` logs these quantities every N optimizer steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from accelerate.utils import reduce
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .callbacks import GRStepState

GRADIENT_KEYS = ("gr_grad_norm", "gr_perturbed_grad_norm", "gr_cosine")
ADAPTIVE_LR_KEYS = ("adaptive_lr_mean", "adaptive_lr_var", "adaptive_lr_max")


class GradientNormProbe:
    """Measures ‖g‖ of one backward with gradient hooks: each parameter's gradient of this pass, this replica's
    own, before accumulation into `.grad` and before DDP's all-reduce. Records `gr_grad_norm` on `close()`.

    Args:
        step_state: where the measurement is added (one value per micro-batch, averaged at the step's end).
        params: the parameters to watch.
        scale: divides the raw norm (loss scale over the accumulation normalization), so it describes one batch.
    """

    def __init__(self, step_state: GRStepState, params: list[torch.Tensor], scale: float) -> None:
        self.step_state, self.scale = step_state, scale
        self.squares: list[torch.Tensor] = []
        self.handles = [p.register_hook(self._square) for p in params]

    def _square(self, grad: torch.Tensor) -> None:
        self.squares.append(grad.detach().double().pow(2).sum())

    def _remove_hooks(self) -> float:
        for handle in self.handles:
            handle.remove()
        return math.sqrt(_total(self.squares))

    def close(self) -> None:
        record(self.step_state, [("gr_grad_norm", self._remove_hooks() / self.scale)])


class SecondPassProbe(GradientNormProbe):
    """Measures ‖g2‖ and cos(g1, g2) during GR's second backward, with one held copy of g1.

    Args:
        step_state: where the measurements are added.
        params / grads: the parameters and their g1 (read before `.grad` is rescaled in place).
        norm: ‖g1‖ as the step computed it.
        scale: as for `GradientNormProbe`.
    """

    def __init__(
        self, step_state: GRStepState, params: list[torch.Tensor], grads: list[torch.Tensor], norm: float, scale: float
    ) -> None:
        self.norm = norm
        self.g1 = {id(p): g.detach().clone() for p, g in zip(params, grads)}
        self.dots: list[torch.Tensor] = []
        super().__init__(step_state, [], scale)
        self.handles = [p.register_hook(self._hook(self.g1[id(p)])) for p in params]

    def _hook(self, g1: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def accumulate(grad: torch.Tensor) -> None:
            self._square(grad)
            self.dots.append((grad.detach().double() * g1.double()).sum())

        return accumulate

    def close(self) -> None:
        """Remove the hooks, release g1 and add this micro-batch's ‖g1‖, ‖g2‖, cos(g1, g2) to the step state."""
        g2_norm = self._remove_hooks()
        self.g1 = {}
        dot = _total(self.dots)
        cosine = dot / (self.norm * g2_norm) if g2_norm > 0 and self.norm > 0 else 0.0
        record(self.step_state, zip(GRADIENT_KEYS, (self.norm / self.scale, g2_norm / self.scale, cosine)))


def _total(parts: list[torch.Tensor]) -> float:
    """The sum of 0-dim tensors, synchronized with the host once."""
    return float(sum(t.cpu() for t in parts)) if parts else 0.0


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
    sums, squares, maxima, count = [], [], [], 0
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
            sums.append(rate.sum().cpu())
            squares.append(rate.pow(2).sum().cpu())
            maxima.append(rate.max().cpu())
            count += rate.numel()
    if count == 0:
        return {}
    mean = float(sum(sums)) / count
    variance = max(float(sum(squares)) / count - mean**2, 0.0)
    return {"adaptive_lr_mean": mean, "adaptive_lr_var": variance, "adaptive_lr_max": float(max(maxima))}


class GRDiagnosticsCallback(TrainerCallback):
    """Logs, every `every` optimizer steps, the quantities behind the paper's "when is GR harmful" analysis.

    On GR steps: `gr_grad_norm` (‖g1‖), `gr_perturbed_grad_norm` (‖g2‖), `gr_cosine` (cos(g1, g2)), of the
    step's batch at the parameters it started from (averaged over micro-batches and replicas). On plain steps
    (λ = 0, zero-warmup): `gr_grad_norm`, ‖g‖ measured the same way (per micro-batch and replica, averaged).
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

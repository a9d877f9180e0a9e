"""Diagnostics that show when GR is harmful: gradient norms and the adaptive optimizer's statistics.

The paper's analysis (Zhao, Zhang & Hu, ICML 2024, §4): early in training GR shrinks the gradient norm
faster than plain training, Adam/RMSProp accumulate their second moments from these biased gradients, and the
spread of the per-element adaptive learning rate lr/(√v̂ + eps) grows while the LR warmup runs.
`GRDiagnosticsCallback` logs these quantities every N optimizer steps (into the trainer's metrics, which
`GRMixin.log` averages into the next training log entry); `adaptive_lr_stats` computes the optimizer's part.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ._internal import gradient, sync
from ._internal.metrics import GRMetrics

__all__ = ["GRDiagnosticsCallback", "adaptive_lr_stats"]

GRADIENT_KEYS = ("gr_grad_norm", "gr_perturbed_grad_norm", "gr_cosine")
UPDATE_KEY = "update_size"  # ‖Δθ‖/lr of the step's update
ADAPTIVE_LR_KEYS = (
    "adaptive_lr_mean",
    "adaptive_lr_var",
    "adaptive_lr_max",
    "adaptive_lr_log_var",
    "adaptive_lr_inactive_fraction",
    "adaptive_psi_mean",
    "adaptive_psi_var",
)


def second_moments(optimizer: torch.optim.Optimizer) -> list[tuple[torch.Tensor, float, float]]:
    """(v̂, lr, eps) for every parameter with adaptive state: what the optimizer divides the update by.

    Adam/AdamW: v̂ = exp_avg_sq/(1 − β2^step), or the same of `max_exp_avg_sq` under amsgrad (what torch's
    update uses). RMSProp: the square average, minus grad_avg² when centered. Empty for SGD or before step 1.
    """
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    found = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" in state and "step" in state:
                second = state["max_exp_avg_sq"] if group.get("amsgrad") and "max_exp_avg_sq" in state else None
                second = state["exp_avg_sq"] if second is None else second
                v_hat = second.double() / (1 - group["betas"][1] ** float(state["step"]))
            elif "square_avg" in state:
                v_hat = state["square_avg"].double()
                if group.get("centered") and "grad_avg" in state:
                    v_hat = v_hat - state["grad_avg"].double().square()
            else:
                continue
            found.append((v_hat, float(group["lr"]), float(group["eps"])))
    return found


def adaptive_lr_stats(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Statistics of the per-element adaptive learning rate, from the optimizer's state right after a step.

    - `adaptive_lr_mean`, `adaptive_lr_var`, `adaptive_lr_max`: of lr/(√v̂ + eps) over all elements;
    - `adaptive_lr_log_var`: the population variance of ln ψ, ψ = 1/(√v̂ + eps), over the *active* elements
      (√v̂ > 10·eps): free of the learning rate and of scale, and of the elements whose gradient is ~0 (e.g.
      attention key biases), whose 1/eps would otherwise dominate;
    - `adaptive_psi_mean`, `adaptive_psi_var`: the mean and population variance of ψ itself over the active
      elements: free of the learning rate but not of scale (ψ grows as the gradients shrink, as RAdam's
      Var[ψ] does), the quantity the paper's argument goes through;
    - `adaptive_lr_inactive_fraction`: the share of elements with optimizer state that are not active.
    """
    moments = second_moments(optimizer)
    if not moments:
        return {}
    sums = torch.zeros(8, dtype=torch.float64)  # Σrate, Σrate², count, Σlnψ, Σ(lnψ)², active, Σψ, Σψ² (active)
    maxima = []
    for v_hat, lr, eps in moments:
        root = v_hat.clamp(min=0).sqrt()
        rate = lr / (root + eps)
        active = root > 10 * eps
        psi = 1 / (root[active] + eps)
        log_psi = psi.log()
        count = torch.tensor(float(rate.numel()), dtype=torch.float64, device=rate.device)
        part = [rate.sum(), rate.square().sum(), count, log_psi.sum(), log_psi.square().sum(), active.sum().double()]
        part += [psi.sum(), psi.square().sum()]
        sums += torch.stack(part).cpu()
        maxima.append(rate.max().cpu())
    total, rate_sum, rate_sq, count_active = float(sums[2]), float(sums[0]), float(sums[1]), float(sums[5])
    mean = rate_sum / total
    stats = {
        "adaptive_lr_mean": mean,
        "adaptive_lr_var": max(rate_sq / total - mean**2, 0.0),
        "adaptive_lr_max": float(max(maxima)),
        "adaptive_lr_inactive_fraction": 1.0 - count_active / total,
    }
    if count_active > 0:
        log_mean = float(sums[3]) / count_active
        stats["adaptive_lr_log_var"] = max(float(sums[4]) / count_active - log_mean**2, 0.0)
        psi_mean = float(sums[6]) / count_active
        stats["adaptive_psi_mean"] = psi_mean
        stats["adaptive_psi_var"] = max(float(sums[7]) / count_active - psi_mean**2, 0.0)
    else:
        stats["adaptive_lr_log_var"] = stats["adaptive_psi_mean"] = stats["adaptive_psi_var"] = math.nan
    return stats


def update_size(params: list[torch.Tensor], before: list[torch.Tensor], lr: float) -> torch.Tensor:
    """‖θ − θ_before‖ / lr over the parameters (their local shards, summed over ranks under FSDP2), on the device."""
    steps = torch._foreach_sub([p.detach() for p in sync.local_shards(params)], before)
    squared = gradient.squared_norm(steps)
    if sync.is_sharded(params):
        squared = sync.all_reduce_sum(squared, sync.world_size())
    return squared.sqrt() / lr if lr > 0 else torch.full_like(squared, math.nan)


class GRDiagnosticsCallback(TrainerCallback):
    """Logs, every `every` optimizer steps, the quantities behind the paper's "when is GR harmful" analysis.

    On GR steps: `gr_grad_norm` (‖g1‖), `gr_perturbed_grad_norm` (‖g2‖), `gr_cosine` (cos(g1, g2)), of the
    step's batch at the parameters it started from (averaged over micro-batches and replicas). On plain and reuse
    steps (λ = 0, zero-warmup): `gr_grad_norm`, ‖g‖ measured the same way. With Adam/AdamW/RMSProp, right after
    the step's update: `adaptive_lr_mean`, `adaptive_lr_var`, `adaptive_lr_max` of lr/(√v̂ + eps), and the
    learning-rate-free `adaptive_lr_log_var`, `adaptive_lr_inactive_fraction`, `adaptive_psi_mean` and
    `adaptive_psi_var` (see `adaptive_lr_stats`). For every optimizer: `update_size`, ‖Δθ‖/lr, the size of the
    step's update over the first parameter group's learning rate (for SGD, the norm of the applied gradient; for
    Adam, how far the adaptive rates moved θ); measuring it keeps a copy of the trainable parameters for the step.
    The entry logged after step s describes step s. Off-diagnostic steps cost nothing.

    Args:
        every (`int`): log every this many optimizer steps.
    """

    def __init__(self, every: int) -> None:
        if not isinstance(every, int) or every <= 0:
            raise ValueError(f"GRDiagnosticsCallback needs every >= 1, got {every!r}.")
        self.every = every
        self.metrics: GRMetrics | None = None
        self.before: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (parameters, their copy)

    def bind(self, metrics: GRMetrics) -> None:
        """Give the callback the trainer's `GRMetrics` (done by `GRMixin`)."""
        self.metrics = metrics

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.metrics is not None:
            self.metrics.recording = (state.global_step + 1) % self.every == 0
            model = kwargs.get("model")
            if self.metrics.recording and model is not None:
                params = [p for p in model.parameters() if p.requires_grad]
                self.before = (params, [t.detach().clone() for t in sync.local_shards(params)])
        return control

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Right after optimizer.step() and before the scheduler moves the lr: the step's own learning rate.
        optimizer = kwargs.get("optimizer")
        if self.metrics is not None and self.metrics.recording and optimizer is not None:
            for key, value in adaptive_lr_stats(optimizer).items():
                self.metrics.add(key, value)
            if self.before is not None:
                self.metrics.add(UPDATE_KEY, update_size(*self.before, float(optimizer.param_groups[0]["lr"])))
        self.before = None
        return control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.metrics is not None and self.metrics.recording:
            self.metrics.recording = False
            control.should_log = True  # the entry logged after this step carries the values
        return control

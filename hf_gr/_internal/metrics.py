"""The record phase's metrics: what a GR step measures, kept on the device until `GRMixin.log` averages it."""

from __future__ import annotations

import logging
from typing import Any

import torch
from accelerate.utils import reduce

logger = logging.getLogger("hf_gr.diagnostics")


def perturbed_loss_rise(loss: torch.Tensor, perturbed_loss: torch.Tensor) -> torch.Tensor:
    """`gr_sharpness` of one micro-batch: L(θ + ε) − L(θ), pass 2's loss less pass 1's (on the device)."""
    return perturbed_loss - loss


class GRMetrics:
    """A training step's GR metrics, as TRL keeps `_metrics`: values added as they are measured, averaged into the
    next log entry by `pop_means`. Kept as running sums (tensors stay on the device until the log), so a run that
    never logs holds a few numbers, not one per step.

    `recording` says whether the current step measures the diagnostics (set by `GRDiagnosticsCallback`).
    `gr_degenerate_fraction` (the share of GR micro-batches whose ‖g1‖ gave no direction, so that they ran as
    plain steps) is warned about once, the first time it is non-zero.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.recording = False
        self.warned_degenerate = False

    def add(self, key: str, value: float | torch.Tensor) -> None:
        """Record one measurement (per micro-batch, or per step) of `key`."""
        self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.counts[key] = self.counts.get(key, 0) + 1

    def pop_means(self, replica_device: torch.device | None = None) -> dict[str, float]:
        """The mean of each key's values since the last call (then cleared); with `replica_device`, also averaged
        over the data-parallel replicas (a collective on that device: every replica must call it)."""
        means = {key: float(total) / self.counts[key] for key, total in self.sums.items()}
        self.sums, self.counts = {}, {}
        if replica_device is not None and means:
            keys = sorted(means)
            tensor = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=replica_device)
            means = dict(zip(keys, reduce(tensor, reduction="mean").tolist()))
        if means.get("gr_degenerate_fraction", 0.0) > 0 and not self.warned_degenerate:
            self.warned_degenerate = True
            logger.warning(
                "GR had no direction on %.1f%% of its micro-batches since the last log: ‖g1‖ was zero or below the "
                "smallest normal number of the gradients' dtype, so they ran as plain steps "
                "(`gr_degenerate_fraction`). With fp16 weights use a loss scaler (fp16=True) or bf16/fp32 weights.",
                100 * means["gr_degenerate_fraction"],
            )
        return means


class GradientNormProbe:
    """Measures ‖g‖ of one backward with gradient hooks (each parameter's gradient of this pass, this replica's own,
    before accumulation into `.grad` and before DDP's all-reduce), and records `gr_grad_norm` on exit.

    Args:
        params: the parameters to watch.
        scale: divides the raw norm (loss scale over the accumulation normalization), so it describes one batch.
        record: where the measurement goes (`GRMetrics.add`).
    """

    def __init__(self, params: list[torch.Tensor], scale: float, record: Any) -> None:
        self.params, self.scale, self.record = params, scale, record
        self.squares: list[torch.Tensor] = []
        self.handles: list[Any] = []

    def __enter__(self) -> GradientNormProbe:
        self.handles = [p.register_hook(self._square) for p in self.params]
        return self

    def _square(self, grad: torch.Tensor) -> None:
        self.squares.append(grad.detach().double().pow(2).sum())  # read at log time: no host sync here

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        if exc[0] is None and self.squares:
            self.record("gr_grad_norm", torch.stack(self.squares).sum().sqrt() / self.scale)

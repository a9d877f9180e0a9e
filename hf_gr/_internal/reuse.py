"""LookSAM's reuse of the GR correction between GR steps (Liu et al., CVPR 2022, arXiv 2203.02714).

On each GR step, with g1 and g_GR that step's gradients (accumulated over its micro-batches, replica means):
c = g_GR − g1, c⊥ = c − (⟨c, g1⟩/‖g1‖²)·g1, u = c⊥/‖c⊥‖ and ρ = ‖c⊥‖/‖g1‖. A reuse step (single pass) with
gradient g (accumulated, replica mean, before clipping) uses g + ρ·‖g‖·u. A reuse step before the first GR step
is a plain step. The math is `gradient.orthogonal_correction_` and `add_correction_`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import gradient
from .sync import flat_buffer, local_shards


class ReuseState:
    """u (one flat buffer, with a view per trainable parameter) and ρ; one parameter-sized buffer.

    The buffer is float32, or float64 when a parameter is float64: u = c⊥/‖c⊥‖ comes from a small difference of
    nearly equal gradients, which half precision loses. For bf16 or fp16 weights it therefore takes 4 bytes per
    trainable parameter, twice the weights' own size (for float32 or float64 weights, the weights' size).

    During a GR step the buffer collects the step's g1 (summed over micro-batches); after its last micro-batch it
    becomes u. `state_dict` holds u and ρ, so a resumed run continues bit for bit.
    """

    def __init__(self) -> None:
        self.flat: torch.Tensor | None = None
        self.view_of: dict[int, torch.Tensor] = {}
        self.rho: torch.Tensor | None = None
        self.ready = False  # a GR step has set u and ρ
        self.collecting = False  # inside a GR step
        self._loaded: dict[str, Any] | None = None

    def allocate(self, trainable: list[torch.Tensor]) -> None:
        """The flat buffer for `trainable` (their local shards under FSDP2); a loaded state is installed into it."""
        self.flat, self.view_of = flat_buffer(trainable)
        if self._loaded is not None:
            self.flat.copy_(self._loaded["gr_reuse_u"])
            self.rho = self._loaded["gr_reuse_rho"].to(self.flat.device)
            self.ready, self._loaded = bool(self._loaded["gr_reuse_ready"]), None

    def collect_(self, trainable: list[torch.Tensor], params: list[torch.Tensor], g1: list[torch.Tensor]) -> None:
        """Add a GR micro-batch's g1 (`params`' local gradients) to the buffer; zero it at a step's first."""
        if self.flat is None or len(self.view_of) != len(trainable):
            self.allocate(trainable)
        if not self.collecting:
            self.flat.zero_()
            self.ready, self.collecting = False, True
        gradient.add_([self.view_of[id(p)] for p in params], [g.to(self.flat.dtype) for g in g1])

    def finish_(
        self,
        trainable: list[torch.Tensor],
        mean: Callable[[torch.Tensor], torch.Tensor] | None,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> None:
        """After a GR step's last micro-batch (`.grad` = g_GR): u and ρ. `mean` turns the buffer's local g1 sum into
        the replica mean (DDP with per-replica perturbation); `all_reduce` sums scalars over shards (FSDP2)."""
        if mean is not None:
            self.flat.copy_(mean(self.flat))
        params, grads = gradient.params_with_grads(trainable)
        views = [self.view_of[id(p)] for p in params]
        self.rho = gradient.orthogonal_correction_(self.flat, views, local_shards(grads), all_reduce=all_reduce)
        self.ready, self.collecting = True, False

    def apply_(self, trainable: list[torch.Tensor], all_reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """A reuse step's last micro-batch: g ← g + ρ·‖g‖·u on the accumulated, replica-mean gradient."""
        if self._loaded is not None:
            self.allocate(trainable)
        if not self.ready:
            return
        params, grads = gradient.params_with_grads(trainable)
        if not grads:
            return
        shards = local_shards(grads)
        squared = gradient.squared_norm(shards)
        if all_reduce is not None:
            squared = all_reduce(squared)
        gradient.add_correction_(shards, [self.view_of[id(p)] for p in params], self.rho, squared.sqrt())

    def state_dict(self) -> dict[str, Any]:
        """u, ρ and whether they are set (empty before the first GR step)."""
        if self.flat is None:
            return dict(self._loaded) if self._loaded is not None else {}
        rho = self.rho.detach().cpu().clone() if self.rho is not None else torch.zeros(())
        return {"gr_reuse_u": self.flat.detach().cpu().clone(), "gr_reuse_rho": rho, "gr_reuse_ready": self.ready}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (installed once the parameters are known)."""
        if "gr_reuse_u" in state:
            self._loaded = {k: state[k] for k in ("gr_reuse_u", "gr_reuse_rho", "gr_reuse_ready")}
            self.flat = None

"""One-pass SAM (`gr_ascent_direction="previous_step"`): the ascent direction from the previous optimizer step.

D is the gradient the optimizer applied at the last completed optimizer step, GR or plain: accumulated over its
micro-batches, all-reduced under DDP (a shard under FSDP2), unscaled under fp16. A GR step with α_t = 1 then runs
one forward-backward at θ + r·D/‖D‖, whose gradient is the update (AsyncSAM, arXiv 2503.11147, perturbs along a
stale gradient the same way). Clipping and loss scaling change D's length, not its direction.

D is captured by a hook on the optimizer's `step`, which runs only when the optimizer really steps: after a step the
fp16 scaler skipped there is no D (`step_ended`). It is kept in one flat buffer of the parameters' size, in
float32 or wider.
"""

from __future__ import annotations

from typing import Any

import torch

from . import gradient, sync


class PreviousDirection:
    """D, the last applied gradient, with a view per trainable parameter; `ready` once a step has set it."""

    def __init__(self) -> None:
        self.flat: torch.Tensor | None = None
        self.view_of: dict[int, torch.Tensor] = {}
        self.ready = False
        self.fresh = False  # captured during the current optimizer step
        self._divisor: tuple[torch.Tensor, torch.Tensor] | None = None  # (‖D‖ or 1, whether D has a direction)
        self._loaded: torch.Tensor | None = None
        self._handle: Any = None

    def attach(self, optimizer: Any, params: list[torch.Tensor]) -> None:
        """Capture D at every step of `optimizer` (the torch optimizer under accelerate's wrapper), for `params`.

        A new attachment (a new `train()`, another `hyperparameter_search` trial) starts without a D, unless a
        resumed checkpoint's D waits to be installed."""
        inner = getattr(optimizer, "optimizer", optimizer)
        if self._handle is not None:
            self._handle.remove()
        self.flat, self.view_of, self._divisor = None, {}, None
        sync.check_one_device(params)  # refused now, not at the first step
        if self._loaded is None:
            self.ready = self.fresh = False
        self._handle = inner.register_step_pre_hook(lambda *args, **kwargs: self.capture_(params))

    def _allocate(self, params: list[torch.Tensor]) -> None:
        self.flat, self.view_of = sync.flat_buffer(params)
        if self._loaded is not None:
            self.flat.copy_(self._loaded)
            self._loaded, self.ready = None, True

    def capture_(self, params: list[torch.Tensor]) -> None:
        """D ← the parameters' `.grad` as the optimizer is about to apply it (a missing gradient counts as 0).

        A D that is not finite (an overflowing fp16 step, which a fused optimizer skips on the device, after this
        hook) is set to 0, on the device: the next GR step is then a plain step, not a step to θ + NaN.
        """
        if self.flat is None or len(self.view_of) != len(params):
            self._allocate(params)
        with torch.no_grad():
            for p in params:
                view = self.view_of[id(p)]
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(sync.local_shards([p.grad])[0])
            if self.flat.numel():  # (an FSDP2 rank may hold no trainable elements)
                low, high = torch.aminmax(self.flat)  # NaN and ±inf reach one of them; cheaper than isfinite().all()
                self.flat.masked_fill_(~(torch.isfinite(low) & torch.isfinite(high)), 0.0)
        self.ready, self.fresh, self._divisor = True, True, None

    def step_ended(self) -> None:
        """An optimizer step ended: D counts only if this step set it (the fp16 scaler's skipped steps never reach the
        optimizer's `step`, so after one the next GR step runs two passes)."""
        if not self.fresh:
            self.ready, self._divisor = False, None
        self.fresh = False

    def direction(self, params: list[torch.Tensor], sum_over_ranks: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        """D's views for `params` and ‖D‖ (1 where D has no direction, so that θ stays put), on the device; ‖D‖ is
        computed once per D."""
        if self.flat is None or self._loaded is not None:
            self._allocate(params)
        if self._divisor is None:
            squared = self.flat.square().sum()
            if sync.is_sharded(params):
                squared = sum_over_ranks(squared)
            self._divisor = gradient.safe_divisor(squared.sqrt(), 0.0)
        return [self.view_of[id(p)] for p in params], self._divisor[0]

    def state_dict(self) -> dict[str, Any]:
        """D, when the next step may use it (absent before the first step, or after a skipped one, as the
        uninterrupted run has none at its next step). Read it between steps, after `step_ended`."""
        if not self.ready:
            return {}
        if self._loaded is not None:
            return {"gr_previous_direction": self._loaded.clone()}
        return {"gr_previous_direction": self.flat.detach().cpu().clone()} if self.flat is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (installed once the parameters are known)."""
        if "gr_previous_direction" in state:
            self._loaded, self.flat, self.ready, self.fresh = state["gr_previous_direction"], None, True, False

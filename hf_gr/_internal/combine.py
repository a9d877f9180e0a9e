"""The combine phase of a GR step: each parameter's update gradient g1 + α·(g2 − g1) + A, formed in `.grad`.

A is what earlier micro-batches of the optimizer step accumulated. `combine` is the one rule for every parameter,
including one whose gradient is missing from a pass (data-dependent routing or an early exit leaves it out of that
pass's graph): a missing gradient counts as 0. Two ways to apply it:

- `HookCombination` (unsharded, DDP): gradient hooks turn each parameter's arriving g2 into the update before
  autograd accumulates it into `.grad` and before DDP reads it, so the last micro-batch's one all-reduce carries the
  combined gradient;
- `combine_shards` (FSDP2, whose hooks on sharded parameters do not fire): after pass 2 has reduce-scattered g2 into
  `.grad`, on each rank's local shards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import gradient, sync


def combine(
    g1: torch.Tensor | None, g2: torch.Tensor | None, alpha: float, accumulated: torch.Tensor | None
) -> torch.Tensor | None:
    """One parameter's GR gradient g1 + α·(g2 − g1) + A, a gradient missing from one pass counting as 0.

    (1 − α)·g1 + A without g2, α·g2 + A without g1, A (or None) without either. With a g1 the result is formed in
    g1's storage (`gradient.mix_`, whose interpolation form stays in range at any α); otherwise it is a new tensor
    and g2 and A are left intact.
    """
    if g1 is not None:
        return gradient.mix_(g1, g2 if g2 is not None else torch.zeros_like(g1), alpha, accumulated)
    if g2 is None:
        return accumulated
    part = g2 if alpha == 1.0 else g2 * alpha
    return part if accumulated is None else part + accumulated


def measure(g2: torch.Tensor, g1: torch.Tensor | None) -> torch.Tensor:
    """(‖g2‖², ⟨g2, g1⟩) of one parameter in float32 or wider, on g2's device (⟨g2, g1⟩ = 0 without a g1)."""
    g2 = g2.detach().to(torch.promote_types(g2.dtype, torch.float32))
    dot = (g2 * g1.to(g2.dtype)).sum() if g1 is not None else torch.zeros((), dtype=g2.dtype, device=g2.device)
    return torch.stack([g2.square().sum(), dot])


class HookCombination:
    """Gradient hooks that turn each parameter's arriving g2 into its `combine`d gradient, in g1's storage.

    At α = 1 without diagnostics g1 is not kept (g = g2 + A). A parameter with a g1 that gets no g2 is finished
    after pass 2 (`finish_unfired`), or, under DDP with `find_unused_parameters` (which reads the `.grad` of the
    parameters it finds unused as backward starts), before pass 2's backward (`finish_unreached`, a forward hook).

    Args:
        trainable (`list[torch.Tensor]`): every trainable parameter.
        g1_of (`dict[int, torch.Tensor]`): id(parameter) → its g1, for the parameters pass 1 reached.
        accumulated_of (`dict[int, torch.Tensor | None]`): id(parameter) → A.
        alpha (`float`): α_t.
        keep_g1 (`bool`): whether g1 is needed (α ≠ 1, or ⟨g2, g1⟩ is measured).
        measured (`list[torch.Tensor]`, *optional*): where `measure`'s sums are appended, when diagnostics record.
    """

    def __init__(self, trainable: list[torch.Tensor], g1_of: dict[int, torch.Tensor],
                 accumulated_of: dict[int, torch.Tensor | None], alpha: float, keep_g1: bool,
                 measured: list[torch.Tensor] | None) -> None:  # fmt: skip
        self.params, self.alpha, self.measured = trainable, alpha, measured
        self.has_g1 = [id(p) in g1_of for p in trainable]
        self.g1: list[torch.Tensor | None] = [g1_of.get(id(p)) if keep_g1 else None for p in trainable]
        self.accumulated = [accumulated_of.get(id(p)) for p in trainable]
        self.done = [False] * len(trainable)

    def install(self) -> list[Any]:
        """Register the hooks; returns their handles (remove them after pass 2)."""
        return [p.register_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _hook(self, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def on_g2(g2: torch.Tensor) -> torch.Tensor:
            if self.done[i]:  # a later part of g2 (reentrant checkpointing accumulates per segment): α·part
                return g2 if self.alpha == 1.0 else g2 * self.alpha
            if not self.has_g1[i]:
                self.params[i].grad = None  # A stays intact in the new tensor `combine` returns
            return self._finish(i, g2)

        return on_g2

    def _finish(self, i: int, g2: torch.Tensor | None) -> torch.Tensor:
        """Parameter i's combined gradient (a gradient, never None, for a parameter that had a g1)."""
        self.done[i] = True
        g1, self.g1[i] = self.g1[i], None
        if self.measured is not None and g2 is not None:
            self.measured.append(measure(g2, g1))
        result = combine(g1, g2, self.alpha, self.accumulated[i])
        return result if result is not None else torch.zeros_like(self.params[i])

    def finish_unreached(self, module: nn.Module, args: Any, outputs: Any) -> None:
        """A forward hook for pass 2 under DDP: the parameters with a g1 that pass 2's graph does not reach get
        (1 − α)·g1 + A now, before the backward in which DDP all-reduces their `.grad` as unused parameters."""
        reached = sync.reached_parameters(outputs)
        for i, p in enumerate(self.params):
            if self.has_g1[i] and not self.done[i] and id(p) not in reached:
                p.grad = self._finish(i, None)

    def finish_unfired(self) -> int:
        """After pass 2: a parameter that had a g1 but got no g2 gets (1 − α)·g1 + A; one with neither keeps A.
        Returns how many had a g1 and got no g2 (and were not finished before pass 2's backward)."""
        unfired = 0
        for i, p in enumerate(self.params):
            if self.has_g1[i] and not self.done[i]:
                p.grad = self._finish(i, None)
                unfired += 1
        return unfired


def combine_shards(trainable: list[torch.Tensor], g1_of: dict[int, tuple[torch.Tensor, torch.Tensor]],
                   accumulated_of: dict[int, torch.Tensor | None], alpha: float,
                   measured: list[torch.Tensor] | None) -> None:  # fmt: skip
    """FSDP2, after pass 2 reduce-scattered g2 into `.grad` (None before it): each parameter's `combine`d gradient
    on this rank's shards, in g1's storage when it had one, else in g2's.

    `g1_of` maps id(parameter) → (its g1 DTensor, that DTensor's local shard).
    """
    for p in trainable:
        a = accumulated_of.get(id(p))
        a_local = None if a is None else sync.local_shards([a])[0]
        g2 = sync.local_shards([p.grad])[0] if p.grad is not None else None
        first, first_local = g1_of.get(id(p), (None, None))
        if first is None and g2 is None:
            p.grad = a
            continue
        if measured is not None:
            measured.append(measure(g2 if g2 is not None else torch.zeros_like(first_local), first_local))
        result = combine(first_local, g2, alpha, a_local)
        if first is not None:
            p.grad = first
        elif result is not g2:
            g2.copy_(result)

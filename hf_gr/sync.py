"""Where GR's passes meet data parallelism: when gradients are reduced, and the few collectives GR adds.

- DDP: pass 1 runs under `no_sync`, so g1 stays each replica's own; pass 2's backward carries the step's one
  all-reduce. `gr_sync_perturbation` averages g1 first (one flat all-reduce).
- FSDP2 (`fully_shard`): parameters and gradients are sharded DTensors; with gradient sync off FSDP2 keeps the
  gradients outside `.grad` (and would fold them into the next synced backward), so both passes of every GR
  micro-batch reduce-scatter. GR works on each rank's local shards and sums scalars over ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()  # type: ignore[assignment,misc]


def is_sharded(tensors: list[torch.Tensor]) -> bool:
    """Whether the parameters are FSDP2 shards (DTensors)."""
    return any(isinstance(t, DTensor) for t in tensors)


def local_shards(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each rank's own shard of a DTensor (a view of its storage), the tensor itself otherwise."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def world_size(accelerator: Any = None) -> int:
    """The number of data-parallel processes (from the accelerator, else torch.distributed)."""
    if accelerator is not None:
        return int(accelerator.num_processes)
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """The sum of `tensor` over all processes (a new tensor; `tensor` itself when there is one process)."""
    if world == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def average_across_replicas_(trainable: list[torch.Tensor], world: int) -> None:
    """`.grad` ← its mean over the replicas, in one flat all-reduce (for `gr_sync_perturbation`).

    A parameter without a gradient on this replica takes part with zeros, so all replicas reduce alike.
    """
    for p in trainable:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in trainable]
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]), world) / world
    chunks = torch.split(flat, [g.numel() for g in grads])
    torch._foreach_copy_(grads, [c.view_as(g) for c, g in zip(chunks, grads)])


@contextlib.contextmanager
def gradient_sync(model: nn.Module, accelerator: Any, sharded: bool, on: bool) -> Iterator[None]:
    """Gradients not reduced in backward (DDP's `no_sync`, for pass 1), or, under FSDP2, reduce-scatter forced to
    `on` and put back as it was afterwards (the Trainer turns it off for all but the last micro-batch)."""
    if sharded:
        previous = _fsdp_gradient_sync(model)
        model.set_requires_gradient_sync(on)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(previous)
    elif on:
        yield
    elif accelerator is not None:
        with accelerator.no_sync(model):
            yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def _fsdp_gradient_sync(model: nn.Module) -> bool:
    """Whether an FSDP2 model reduce-scatters its gradients in backward now (FSDP2 has no public getter)."""
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        group = getattr(get_state(), "_fsdp_param_group", None) if get_state is not None else None
        if group is not None:
            return bool(group.reduce_grads)
    return True

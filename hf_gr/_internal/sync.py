"""Where GR's passes meet data parallelism: when gradients are reduced, and the few collectives GR adds.

- DDP: pass 1 runs under `no_sync`, so g1 stays each replica's own; pass 2's backward carries the step's one
  all-reduce. `gr_sync_perturbation` averages g1 first (one flat all-reduce).
- FSDP2 (`fully_shard`): parameters and gradients are sharded DTensors; with gradient sync off FSDP2 keeps the
  gradients outside `.grad` (and would fold them into the next synced backward), so both passes of every GR
  micro-batch reduce-scatter. GR works on each rank's local shards and sums scalars over ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
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


def check_one_device(params: list[torch.Tensor]) -> None:
    """Refuse parameters spread over several devices, which a flat buffer (`flat_buffer`) cannot hold."""
    devices = sorted({str(p.device) for p in local_shards(params)})
    if len(devices) > 1:
        raise ValueError(
            f"gr_ascent_direction='previous_step' and gr_reuse keep one buffer on one device, but the trainable "
            f"parameters are on {', '.join(devices)} (a device_map over several devices). Use "
            "gr_ascent_direction='batch' without gr_reuse, or DDP/FSDP2 with one device per process."
        )


def flat_buffer(params: list[torch.Tensor]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One zeroed flat buffer the size of the parameters' local shards, in float32 or wider (a difference of nearly
    equal gradients, or a direction, is lost in half precision), and id(parameter) → its view shaped like the shard."""
    shards = local_shards(params)
    check_one_device(shards)
    dtype = torch.float32
    for p in shards:
        dtype = torch.promote_types(dtype, p.dtype)
    flat = torch.zeros(sum(p.numel() for p in shards), dtype=dtype, device=shards[0].device)
    view_of, offset = {}, 0
    for p, shard in zip(params, shards):
        view_of[id(p)] = flat[offset : offset + shard.numel()].view_as(shard)
        offset += shard.numel()
    return flat, view_of


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

    A parameter without a gradient on this replica takes part with zeros (a missing gradient counts as 0), so all
    replicas reduce alike; a presence count travels in the same all-reduce, and a parameter that no replica has a
    gradient for keeps `.grad = None`, as in plain training (an optimizer then leaves it alone: no weight decay).
    Only a replica that lacks some gradient reads the counts back (one host sync).
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
    missing = [p.grad is None for p in trainable]
    present = torch.ones(len(grads), dtype=grads[0].dtype, device=grads[0].device)  # built on the device
    for i in (i for i, m in enumerate(missing) if m):
        present[i] = 0
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads] + [present]), world)
    *chunks, counts = torch.split(flat, [g.numel() for g in grads] + [len(grads)])
    own = [(g, c) for g, c, m in zip(grads, chunks, missing) if not m]
    if own:
        torch._foreach_copy_([g for g, _ in own], [c.view_as(g) / world for g, c in own])
    if any(missing):
        somewhere = counts.tolist()
        for p, g, c, m, n in zip(trainable, grads, chunks, missing, somewhere):
            if m and n > 0:
                p.grad = g.copy_(c.view_as(g) / world)


def _ddp(model: nn.Module) -> Any:
    """The `DistributedDataParallel` wrapper `model` is, also under `torch.compile` (which accelerate applies over
    DDP, keeping it as `_orig_mod`); None when it is not DDP."""
    from torch.nn.parallel import DistributedDataParallel

    model = getattr(model, "_orig_mod", model)
    return model if isinstance(model, DistributedDataParallel) else None


def finds_unused_parameters(model: nn.Module) -> bool:
    """Whether `model` is DDP with `find_unused_parameters` (it then reduces the `.grad` of unused parameters)."""
    ddp = _ddp(model)
    return ddp is not None and bool(ddp.find_unused_parameters)


def reduces_only_used_parameters(model: nn.Module) -> bool:
    """Whether `model` is DDP without `find_unused_parameters`, about to all-reduce in this backward: it then
    expects a gradient for every parameter and cannot reduce one that the backward left out."""
    ddp = _ddp(model)
    return ddp is not None and not ddp.find_unused_parameters and bool(ddp.require_backward_grad_sync)


def reached_parameters(outputs: Any) -> set[int]:
    """The ids of the leaf tensors (parameters) that the autograd graph of the tensors in `outputs` reaches.

    What DDP's `find_unused_parameters` computes after forward: `outputs` may nest tensors in dicts, lists,
    tuples and dataclasses (a `ModelOutput`).
    """
    reached: set[int] = set()
    stack, seen = [], set()
    for tensor in _tensors(outputs):
        if tensor.grad_fn is not None:
            stack.append(tensor.grad_fn)
        elif tensor.requires_grad:
            reached.add(id(tensor))
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: its leaf
        if variable is not None:
            reached.add(id(variable))
        stack.extend(following for following, _ in node.next_functions if following is not None)
    return reached


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _tensors(getattr(value, field.name))


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

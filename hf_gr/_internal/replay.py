"""What GR's second pass must see exactly as the first did: the random masks, and BatchNorm's statistics.

Both passes of a GR step must use the same dropout mask (the official code reuses the random key), and pass 2
must not update BatchNorm running statistics a second time (davda54/sam #17, #30).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def rng_state() -> dict[str, Any]:
    """The CPU RNG state, and those of every initialized CUDA device or other accelerator."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    accelerator = getattr(torch, "accelerator", None)
    device = accelerator.current_accelerator() if accelerator is not None and accelerator.is_available() else None
    if device is not None and device.type not in ("cuda", "cpu"):
        module = torch.get_device_module(device.type)
        if hasattr(module, "get_rng_state") and hasattr(module, "set_rng_state"):
            state["accelerator"] = (module, module.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Rewind every RNG to `state`, so the next forward draws the same masks."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "accelerator" in state:
        module, value = state["accelerator"]
        module.set_rng_state(value)


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Keep BatchNorm running statistics as pass 1 left them while pass 2 runs."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False) if v is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for name, value in buffers.items():
                    getattr(m, name).copy_(value)

"""The math of the gradient-regularization (GR) gradient, apart from any training loop.

GR (Zhao, Zhang & Hu, ICML 2024, https://arxiv.org/abs/2406.09723) minimizes L(θ) + λ·‖∇L(θ)‖₂.
Its Hessian-free gradient takes two passes:

    g1 = ∇L(θ),   ε = r·g1/‖g1‖₂,   g2 = ∇L(θ + ε),   g = (1 − α)·g1 + α·g2,   α = λ/r.

The functions here work on lists of tensors with fused multi-tensor ops (`torch._foreach_*`) and know
nothing of the Trainer: the trainer decides when to call them. `exact_gr_loss` builds the double-backprop
objective whose gradient ∇L + λ·H∇L/‖∇L‖ the finite difference approaches as r → 0 (the test oracle).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch


def params_with_grads(parameters: Iterable[torch.nn.Parameter]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The trainable parameters that hold a gradient, and those gradients (frozen or unused ones are left out)."""
    params, grads = [], []
    for p in parameters:
        if p.requires_grad and p.grad is not None:
            params.append(p)
            grads.append(p.grad)
    return params, grads


def global_grad_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm over all `grads` together, accumulated in float32 or wider (a 0-dim tensor; 0 for none)."""
    if not grads:
        return torch.zeros(())
    dtype = torch.float32
    for g in grads:
        dtype = torch.promote_types(dtype, g.dtype)
    norms = torch._foreach_norm(grads, 2, dtype=dtype)
    return torch.linalg.vector_norm(torch.stack(norms))


def norm_floor(grads: Sequence[torch.Tensor]) -> float:
    """The smallest gradient norm that still gives a well-defined direction g1/‖g1‖.

    The smallest normal number of the gradients' least precise dtype: a fixed 1e-12 underflows to 0 in
    half precision, while the norm itself is accumulated in float32.
    """
    return max((torch.finfo(g.dtype).tiny for g in grads if g.is_floating_point()), default=0.0)


def perturbation_scale(norm: float, r: float, floor: float) -> float | None:
    """r/‖g1‖, or None when ‖g1‖ is zero, below `floor` or not finite (then the step must not perturb)."""
    if not math.isfinite(norm) or norm <= floor:
        return None
    return r / norm


def take_grads(params: Sequence[torch.Tensor]) -> list[torch.Tensor | None] | None:
    """Detach every `.grad` from its parameter and return them (None when there is nothing to put aside)."""
    grads = [p.grad for p in params]
    if all(g is None for g in grads):
        return None
    for p in params:
        p.grad = None
    return grads


def snapshot(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A copy of θ, for a bit-exact `restore_` (restoring by subtraction would not be exact)."""
    return [p.detach().clone() for p in params]


def perturb_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], scale: float) -> None:
    """θ ← θ + scale·g1 in place (ε = r·g1/‖g1‖ with scale = r/‖g1‖)."""
    with torch.no_grad():
        torch._foreach_add_(params, grads, alpha=scale)


def restore_(params: Sequence[torch.Tensor], backup: Sequence[torch.Tensor]) -> None:
    """θ ← the copy taken by `snapshot`, bit for bit."""
    with torch.no_grad():
        torch._foreach_copy_(params, backup)


def prepare_second_pass_(
    params: Sequence[torch.Tensor], alpha: float, accumulated: Sequence[torch.Tensor | None] | None = None
) -> None:
    """Turn `.grad` = g1 into ((1 − α)·g1 + A)/α in place, so that pass 2 can add g2 with its loss untouched.

    After pass 2, `finish_second_pass_` multiplies by α: α·((1 − α)·g1 + A)/α + α·g2 = (1 − α)·g1 + α·g2 + A.
    `accumulated` (A) holds what earlier micro-batches left in `.grad`, one entry per parameter (or None).
    With α = 1 (SAM) g1 is dropped and nothing is scaled.
    """
    with torch.no_grad():
        if alpha == 1.0:
            for p in params:
                p.grad = None
        else:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, (1.0 - alpha) / alpha)
        if accumulated is None:
            return
        moved, add_to, add_from = [], [], []
        for p, a in zip(params, accumulated, strict=True):
            if a is None:
                continue
            if p.grad is None:
                p.grad = a
                moved.append(a)
            else:
                add_to.append(p.grad)
                add_from.append(a)
        if alpha != 1.0 and moved:
            torch._foreach_div_(moved, alpha)
        if add_to:
            torch._foreach_add_(add_to, add_from, alpha=1.0 / alpha)


def finish_second_pass_(params: Sequence[torch.Tensor], alpha: float) -> None:
    """`.grad` ← α·`.grad` after pass 2 (see `prepare_second_pass_`); nothing to do for α = 1."""
    if alpha == 1.0:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        with torch.no_grad():
            torch._foreach_mul_(grads, alpha)


def add_back_(params: Sequence[torch.Tensor], accumulated: Sequence[torch.Tensor | None] | None) -> None:
    """`.grad` ← g1 + A, when pass 1 alone makes the step (‖g1‖ zero or not finite)."""
    if accumulated is None:
        return
    with torch.no_grad():
        for p, a in zip(params, accumulated, strict=True):
            if a is not None:
                if p.grad is None:
                    p.grad = a
                else:
                    p.grad.add_(a)


def exact_gr_loss(loss: torch.Tensor, params: Sequence[torch.Tensor], gr_lambda: float) -> torch.Tensor:
    """L + λ·‖∇L‖₂ with ∇L kept in the graph (double backprop): its gradient is ∇L + λ·H∇L/‖∇L‖."""
    grads = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
    squares = [g.to(torch.promote_types(g.dtype, torch.float32)).pow(2).sum() for g in grads if g is not None]
    squared_norm = torch.stack(squares).sum() if squares else None
    if squared_norm is None or squared_norm.item() == 0.0:
        return loss  # ‖∇L‖ = 0: the penalty has no gradient direction (and sqrt has none at 0)
    return loss + gr_lambda * squared_norm.sqrt().to(loss.dtype)

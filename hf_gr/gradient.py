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


def perturb_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], scale: float) -> list[torch.Tensor]:
    """θ ← θ + scale·g1 in place; returns a copy of θ taken before, for a bit-exact `restore_`."""
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch._foreach_add_(params, grads, alpha=scale)
    return backup


def restore_(params: Sequence[torch.Tensor], backup: Sequence[torch.Tensor]) -> None:
    """θ ← the copy taken by `perturb_`, bit for bit (restoring by subtraction would not be exact)."""
    with torch.no_grad():
        torch._foreach_copy_(params, backup)


def combine_first_pass_(
    params: Sequence[torch.Tensor], alpha: float, accumulated: Sequence[torch.Tensor | None] | None = None
) -> None:
    """Turn `.grad` = g1 into (1 − α)·g1 + A in place, ready for pass 2 to accumulate α·g2 on top.

    `accumulated` (A) holds what earlier micro-batches left in `.grad`, one entry per parameter (or None).
    With α = 1 (SAM) g1 is dropped without arithmetic.
    """
    grads = [p.grad for p in params if p.grad is not None]
    with torch.no_grad():
        if alpha == 1.0:
            for p in params:
                p.grad = None
        elif grads:
            torch._foreach_mul_(grads, 1.0 - alpha)
        if accumulated is None:
            return
        add_to, add_from = [], []
        for p, a in zip(params, accumulated, strict=True):
            if a is None:
                continue
            if p.grad is None:
                p.grad = a
            else:
                add_to.append(p.grad)
                add_from.append(a)
        if add_to:
            torch._foreach_add_(add_to, add_from)


def exact_gr_loss(loss: torch.Tensor, params: Sequence[torch.Tensor], gr_lambda: float) -> torch.Tensor:
    """L + λ·‖∇L‖₂ with ∇L kept in the graph (double backprop): its gradient is ∇L + λ·H∇L/‖∇L‖."""
    grads = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
    squares = [g.to(torch.promote_types(g.dtype, torch.float32)).pow(2).sum() for g in grads if g is not None]
    squared_norm = torch.stack(squares).sum() if squares else None
    if squared_norm is None or squared_norm.item() == 0.0:
        return loss  # ‖∇L‖ = 0: the penalty has no gradient direction (and sqrt has none at 0)
    return loss + gr_lambda * squared_norm.sqrt().to(loss.dtype)

"""The math of the gradient-regularization (GR) gradient, apart from any training loop.

GR (Zhao, Zhang & Hu, ICML 2024, https://arxiv.org/abs/2406.09723) minimizes L(θ) + λ·‖∇L(θ)‖₂.
Its Hessian-free gradient takes two passes:

    g1 = ∇L(θ),   ε = r·g1/‖g1‖₂,   g2 = ∇L(θ + ε),   g = (1 − α)·g1 + α·g2 = g1 + α·(g2 − g1),   α = λ/r.

The functions here work on lists of tensors with fused multi-tensor ops (`torch._foreach_*`), keep every scalar
that depends on the data on the device (no host sync), and know nothing of the Trainer. `exact_gr_loss`
builds the double-backprop objective whose gradient ∇L + λ·H∇L/‖∇L‖ the finite difference approaches as r → 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch


def params_with_grads(parameters: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The trainable parameters that hold a gradient, and those gradients (frozen or unused ones are left out)."""
    params, grads = [], []
    for p in parameters:
        if p.requires_grad and p.grad is not None:
            params.append(p)
            grads.append(p.grad)
    return params, grads


def take_grads(params: Sequence[torch.Tensor]) -> list[torch.Tensor | None] | None:
    """Detach every `.grad` from its parameter and return them (None when there is nothing to put aside)."""
    grads = [p.grad for p in params]
    if all(g is None for g in grads):
        return None
    for p in params:
        p.grad = None
    return grads


def put_back_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None] | None) -> None:
    """`.grad` ← the tensors `take_grads` returned (None: no gradient), exactly as they were."""
    for i, p in enumerate(params):
        p.grad = None if grads is None else grads[i]


def accumulate_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None] | None) -> None:
    """`.grad` ← `.grad` + the tensors `take_grads` returned, as backward accumulates (a gradient missing on
    either side is the other one)."""
    for p, g in zip(params, grads or [None] * len(params)):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g
        else:
            with torch.no_grad():
                p.grad.add_(g)


def squared_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ‖g‖² over `grads`, accumulated in float32 or wider, on the first gradient's device (0-dim; 0 for none).

    Gradients on several devices (a `device_map` model) are reduced per device with one fused op each, and the
    per-device partial sums are combined on the first device (`combine_partials`).
    """
    if not grads:
        return torch.zeros(())
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    partials = []
    for group in by_device.values():
        dtype = torch.float32
        for g in group:
            dtype = torch.promote_types(dtype, g.dtype)
        norms = torch._foreach_norm(group, 2, dtype=dtype)
        partials.append(torch.stack(norms).square().sum())
    return combine_partials(partials, grads[0].device)


def combine_partials(partials: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The sum of 0-dim partial results that live on different devices, on `device` (in their widest dtype)."""
    dtype = torch.float32
    for part in partials:
        dtype = torch.promote_types(dtype, part.dtype)
    return torch.stack([part.to(device=device, dtype=dtype) for part in partials]).sum()


def norm_floor(grads: Sequence[torch.Tensor]) -> float:
    """The smallest gradient norm that still gives a well-defined direction g1/‖g1‖.

    The smallest normal number of the gradients' least precise dtype: a fixed 1e-12 underflows to 0 in
    half precision, while the norm itself is accumulated in float32.
    """
    return max((torch.finfo(g.dtype).tiny for g in grads if g.is_floating_point()), default=0.0)


def safe_divisor(norm: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, valid): d = ‖g1‖ when it is finite and above `floor` (a direction exists), else 1; on the device.

    Dividing g1 by d gives the unit direction when there is one, and leaves a zero g1 zero (a plain step) and
    a non-finite g1 non-finite (the fp16 scaler then skips the step), without a host sync.
    """
    valid = torch.isfinite(norm) & (norm > floor)
    return torch.where(valid, norm, torch.ones_like(norm)), valid


def scale_(tensors: Sequence[torch.Tensor], factor: torch.Tensor, divide: bool = False) -> None:
    """Multiply (or divide) every tensor in place by a 0-dim tensor, moved to each tensor's device once."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    with torch.no_grad():
        for device, group in by_device.items():
            value = factor.to(device)
            if divide:
                torch._foreach_div_(group, value)
            else:
                torch._foreach_mul_(group, value)


def snapshot(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A copy of θ, for a bit-exact `restore_` (restoring by subtraction would not be exact)."""
    return [p.detach().clone() for p in params]


def perturb_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], r: float, divisor: torch.Tensor) -> None:
    """θ ← θ + r·g1/d in place, g1 untouched (d = ‖g1‖ from `safe_divisor`, a 0-dim tensor on the device)."""
    by_device: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for p, g in zip(params, grads, strict=True):
        group = by_device.setdefault(p.device, ([], []))
        group[0].append(p)
        group[1].append(g)
    with torch.no_grad():
        for device, (group_params, group_grads) in by_device.items():
            inverse = divisor.to(device).reciprocal()
            torch._foreach_addcmul_(group_params, group_grads, [inverse] * len(group_params), value=r)


def restore_(params: Sequence[torch.Tensor], backup: Sequence[torch.Tensor]) -> None:
    """θ ← the copy taken by `snapshot`, bit for bit."""
    with torch.no_grad():
        torch._foreach_copy_(list(params), list(backup))


def mix_(first: torch.Tensor, second: torch.Tensor, alpha: float, accumulated: torch.Tensor | None) -> torch.Tensor:
    """`first` ← first + α·(second − first) (+ accumulated), in place, and returned.

    The interpolation form never leaves the gradients' range where the result does not, at any α > 0 in any
    dtype (unlike (1 − α)·g1 + α·g2 for large α, or rescaling by 1/α for small α).
    """
    with torch.no_grad():
        first.lerp_(second.to(first.dtype), alpha)
        if accumulated is not None:
            first.add_(accumulated)
    return first


def add_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor | None]) -> None:
    """targets[i] += sources[i] in place, for the sources that are not None."""
    pairs = [(t, s) for t, s in zip(targets, sources, strict=True) if s is not None]
    if pairs:
        with torch.no_grad():
            torch._foreach_add_([t for t, _ in pairs], [s for _, s in pairs])


def dot(first: Sequence[torch.Tensor], second: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ⟨a, b⟩ over paired tensors, accumulated in float32 or wider, on the first tensor's device (0-dim)."""
    if not first:
        return torch.zeros(())
    partials = []
    for a, b in zip(first, second, strict=True):
        dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        partials.append(torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(device=a.device, dtype=dtype)))
    return combine_partials(partials, first[0].device)


def orthogonal_correction_(
    kept: torch.Tensor,
    kept_views: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """LookSAM's kept direction: turn `kept` (holding g1) into u = c⊥/‖c⊥‖ in place, and return ρ = ‖c⊥‖/‖g1‖.

    With g = `grads` (the GR gradient g_GR) and c = g − g1: c⊥ = c − (⟨c, g1⟩/‖g1‖²)·g1 = g − (⟨g, g1⟩/‖g1‖²)·g1.
    `kept` is one flat buffer and `kept_views` its per-parameter views; keep it in float32 or wider (c⊥ is a small
    difference of nearly equal gradients, lost in half precision). Sums accumulate in float32, or float64 for a
    float64 buffer. `all_reduce` sums the scalar partial results over shards (FSDP2), when the tensors are shards.
    When no direction exists (g1 = 0, c⊥ = 0, or a non-finite value) u = 0 and ρ = 0, so that a reuse step stays
    a plain step.
    """
    reduce = all_reduce or (lambda t: t)
    wide = torch.promote_types(kept.dtype, torch.float32)  # sums in float32, or float64 for float64 tensors
    sums = reduce(torch.stack([dot(grads, kept_views).to(device=kept.device, dtype=wide),
                               kept.to(wide).square().sum()]))  # fmt: skip
    g_dot_g1, g1_sq = sums.unbind()
    coefficient = torch.where(g1_sq > 0, g_dot_g1 / g1_sq, torch.zeros_like(g1_sq))
    with torch.no_grad():
        kept.mul_(-coefficient.to(kept.dtype))
        torch._foreach_add_(list(kept_views), [g.to(kept.dtype) for g in grads])
    perp_sq = reduce(kept.to(wide).square().sum())
    valid = torch.isfinite(perp_sq) & (perp_sq > 0) & torch.isfinite(g1_sq) & (g1_sq > 0)
    perp = torch.where(valid, perp_sq, torch.ones_like(perp_sq)).sqrt()
    with torch.no_grad():
        kept.div_(perp.to(kept.dtype)).nan_to_num_(0.0, 0.0, 0.0).mul_(valid.to(kept.dtype))
    return torch.where(valid, perp / torch.where(valid, g1_sq, torch.ones_like(g1_sq)).sqrt(), torch.zeros_like(perp))


def add_correction_(grads: Sequence[torch.Tensor], u_views: Sequence[torch.Tensor], rho: torch.Tensor,
                    grad_norm: torch.Tensor) -> None:  # fmt: skip
    """g ← g + ρ·‖g‖·u in place (a LookSAM reuse step), without a host sync."""
    coefficient = (rho * grad_norm).to(u_views[0].device)
    with torch.no_grad():
        torch._foreach_add_(list(grads), [(u * coefficient).to(g.dtype) for u, g in zip(u_views, grads)])


def exact_gr_loss(loss: torch.Tensor, params: Sequence[torch.Tensor], gr_lambda: float) -> torch.Tensor:
    """L + λ·‖∇L‖₂ with ∇L kept in the graph (double backprop): its gradient is ∇L + λ·H∇L/‖∇L‖.

    Where ∇L = 0 the penalty contributes nothing (‖·‖ has no gradient direction there), without a host sync.
    """
    grads = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
    squares = [g.to(torch.promote_types(g.dtype, torch.float32)).pow(2).sum() for g in grads if g is not None]
    if not squares:
        return loss
    total = torch.stack(squares).sum()
    positive = total > 0
    norm = torch.where(positive, total, torch.ones_like(total)).sqrt() * positive
    return loss + gr_lambda * norm.to(loss.dtype)

"""FlexLoRA's tensor maths (METHODS.md §5): orthogonality, update spectra, sharded slot access.

The controller (``entrolora.flex``) works on *shape groups*: the adapters with equal
``(d_out, d_in, c, dtype, device)`` stacked into ``(G, …)`` batches, so a transformer's hundreds
of adapters cost a handful of batched kernels. Masks select the active directions: a masked
column is exactly zero, so full ``c``-wide computations equal the active-only ones without
gathering slots (whose count differs per module).

Parameters may be FSDP2 ``DTensor``s sharded along any dimension: ``full`` gathers one for
reading (differentiably), ``shard_view`` / ``write_slot`` touch only this process's shard.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch

EPS = 1e-12  # eq. 3's ε


# -- orthogonality (eq. 2, revised: Frobenius norm, not squared) --------------------------------
def _gram_error(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Xₘ, E = XₘᵀXₘ − diag(m))`` for ``x (G, n, c)`` and a 0/1 mask ``m (G, c)``."""
    xm = x * m[:, None, :]
    return xm, xm.mT @ xm - torch.diag_embed(m)


def _gram_grad(xm: torch.Tensor, e: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``∂‖E‖_F/∂X = 2·Xₘ·E/‖E‖_F`` (E symmetric); 0 where ‖E‖ = 0.

    ‖·‖ is not differentiable at E = 0, its minimum; 0 is a subgradient there, and the one
    ``torch.linalg.norm`` uses. Inactive columns come out exactly 0: E's rows and columns of
    masked slots are exact zeros.
    """
    scale = torch.where(norm > 0, 2.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
    return (xm @ e) * scale[:, None, None]


class _GramDistance(torch.autograd.Function):
    """``‖XₘᵀXₘ − I‖_F`` per batch element, with the analytic backward of ``_gram_grad``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        xm, e = _gram_error(x, m)
        norm = torch.linalg.matrix_norm(e)
        ctx.save_for_backward(xm, e, norm)
        return norm

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        xm, e, norm = ctx.saved_tensors
        return _gram_grad(xm, e, norm) * grad[:, None, None], None


def gram_distance(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``‖XₘᵀXₘ − I_m‖_F`` ``(G,)`` for ``x (G, n, c)`` float32, mask ``m (G, c)`` float 0/1.

    P enters as ``P (G, d_out, c)``, Q as ``Qᵀ (G, d_in, c)`` (``QQᵀ = (Qᵀ)ᵀQᵀ``). Differentiable;
    its backward is ``gram_distance_grad``'s formula.
    """
    return _GramDistance.apply(x, m)


@torch.no_grad()
def gram_distance_grad(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(‖E‖_F (G,), ∂‖E‖_F/∂x (G, n, c))`` without autograd — the same code as the backward."""
    xm, e = _gram_error(x, m)
    norm = torch.linalg.matrix_norm(e)
    return norm, _gram_grad(xm, e, norm)


# -- importance (eq. 3 on the update's exact spectrum) ------------------------------------------
def update_spectra(
    p: torch.Tensor, lam: torch.Tensor, q: torch.Tensor, m: torch.Tensor
) -> torch.Tensor:
    """Singular values of ``Pₐ·diag(λₐ)·Qₐ`` per module, ``(G, k)``, from two thin QRs.

    ``Pₐ = U_P R_P``, ``Qₐᵀ = U_Q R_Q``, ``σ = svdvals(R_P·diag(λₐ)·R_Qᵀ)`` — exact, as U_P, U_Q
    have orthonormal columns. Inputs ``p (G, d_out, c)``, ``lam (G, c)``, ``q (G, c, d_in)``,
    bool mask ``m (G, c)``; computed in float64. Masked slots add singular values of 0 (up to
    rounding), which eq. 3 ignores.
    """
    mf = m.to(torch.float64)
    pm = p.to(torch.float64) * mf[:, None, :]
    qm = q.to(torch.float64) * mf[:, :, None]
    rp = torch.linalg.qr(pm, mode="r").R  # (G, min(d_out, c), c)
    rq = torch.linalg.qr(qm.mT, mode="r").R  # (G, min(d_in, c), c)
    core = (rp * (lam.to(torch.float64) * mf)[:, None, :]) @ rq.mT
    return torch.linalg.svdvals(core)


def spectral_entropy(values: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Eq. 3 per row: ``−(1/log r)·Σ s_i log(s_i + ε)``, ``s_i = v_i²/Σv_j²`` (float64).

    ``values (G, k)`` are singular values (zeros allowed); ``r (G,)`` the active ranks. 0 where
    ``r ≤ 1`` or all values are 0.
    """
    energy = values.to(torch.float64).square()
    total = energy.sum(-1, keepdim=True)
    s = energy / torch.where(total > 0, total, 1.0)
    h = -(s * torch.log(s + EPS)).sum(-1)
    r = r.to(torch.float64)
    ok = (r > 1) & (total[:, 0] > 0)
    return torch.where(ok, h / torch.log(torch.where(ok, r, math.e)), 0.0)


def direction_terms(
    p: torch.Tensor, lam: torch.Tensor, q: torch.Tensor, m: torch.Tensor
) -> torch.Tensor:
    """``|λ_i|·‖p_i‖·‖q_i‖`` ``(G, c)`` (float64): each direction's own size; inf where inactive."""
    t = lam.to(torch.float64).abs()
    t = t * torch.linalg.vector_norm(p.to(torch.float64), dim=1)
    t = t * torch.linalg.vector_norm(q.to(torch.float64), dim=2)
    return torch.where(m, t, torch.inf)


# -- sharded tensors (FSDP2 DTensors) -----------------------------------------------------------
def is_sharded(t: torch.Tensor | None) -> bool:
    """True for a ``DTensor`` (FSDP2's sharded parameters, gradients and optimizer states)."""
    return t is not None and hasattr(t, "full_tensor") and hasattr(t, "to_local")


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor all-gathered (differentiably, every process gets the same
    values), anything else as it is."""
    return t.full_tensor() if is_sharded(t) else t


def shard_view(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(local tensor, global offset per dimension)``: the shard a DTensor keeps here."""
    if not is_sharded(t):
        return t, (0,) * t.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), tuple(offset)


def local_slots(
    t: torch.Tensor, dim: int, slots: list[int]
) -> tuple[torch.Tensor, list[int], list[int]]:
    """``(local tensor, local indices, positions in slots)`` of the slots held here along dim."""
    loc, off = shard_view(t)
    lo, n = off[dim], loc.shape[dim]
    pos = [i for i, s in enumerate(slots) if lo <= s < lo + n]
    return loc, [slots[i] - lo for i in pos], pos


@torch.no_grad()
def write_slot(t: torch.Tensor, dim: int, slot: int, value: torch.Tensor | float) -> None:
    """``t.select(dim, slot)[...] = value`` on whatever part of it this process holds.

    ``value`` is a number or the whole (global) slice, shape ``t.shape`` without ``dim``.
    """
    loc, off = shard_view(t)
    if not off[dim] <= slot < off[dim] + loc.shape[dim]:
        return
    target = loc.select(dim, slot - off[dim])
    if not torch.is_tensor(value):
        target.fill_(value)
        return
    other = [d for d in range(t.dim()) if d != dim]
    for vd, d in enumerate(other):
        value = value.narrow(vd, off[d], loc.shape[d])
    target.copy_(value)


def no_autocast(device: torch.device) -> AbstractContextManager:
    """A context that turns autocast off on ``device`` (the regulariser stays float32)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast: nothing to turn off
        return nullcontext()


def add_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """``param.grad += grad`` (the whole tensor's gradient); a DTensor gets its shard only."""
    if not is_sharded(param):
        if param.grad is None:
            param.grad = grad.to(param.dtype)
        else:
            param.grad.add_(grad.to(param.grad.dtype))
        return
    loc, off = shard_view(param)
    piece = grad
    for d in range(grad.dim()):
        piece = piece.narrow(d, off[d], loc.shape[d])
    if param.grad is None:
        from torch.distributed.tensor import DTensor

        param.grad = DTensor.from_local(
            piece.to(loc.dtype).contiguous(), param.device_mesh, param.placements
        )
    else:
        shard_view(param.grad)[0].add_(piece.to(loc.dtype))

"""Effective rank (gradient intrinsic dimensionality, RaLoRA eq. 3) computed batched.

Singular values come from the eigenvalues of the smaller Gram matrix (``G Gᵀ`` or ``Gᵀ G``) in
float64: one batched matmul and one batched ``eigvalsh`` per group of same-shape gradients, on
whatever device the gradients live. Squaring doubles the condition number, but the directions it
blurs have singular values below ~1e-8·σ_max, whose weight in the L1-normalised distribution is
negligible, so the result stays within 1 % of a float64 SVD.

Signal effective rank (METHODS.md §2, "Probe noise"): given the probe's noise estimate ``D`` for
each gradient, the Gram of the smaller side becomes ``M = G Gᵀ − D Dᵀ`` (unbiased for ``μ μᵀ``);
``M`` is symmetric but not PSD, so its eigenvalues are clipped at 0 before the square root.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch


def _gram(g: torch.Tensor) -> torch.Tensor:
    """Float64 Gram of the smaller side of a batch ``(b, m, n)``: ``(b, k, k)``, k = min(m, n)."""
    g = g.to(torch.float64)
    return g @ g.mT if g.shape[-2] <= g.shape[-1] else g.mT @ g


def singular_values(grads: torch.Tensor, noises: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values of a batch ``(b, m, n)``: float64, descending, shape ``(b, min(m, n))``.

    With ``noises`` (same shape), those of the signal: square roots of the eigenvalues of
    ``G Gᵀ − D Dᵀ`` (smaller side) clipped at 0 (METHODS.md §2, probe noise).
    """
    gram = _gram(grads)
    if noises is not None:
        gram -= _gram(noises)
    eig = torch.linalg.eigvalsh(gram)  # ascending
    return eig.clamp_min(0).sqrt().flip(-1)


def erank_from_singular_values(sv: torch.Tensor) -> torch.Tensor:
    """``exp(−Σ p_i log p_i)``, ``p_i = σ_i / Σσ_j`` over the last dim (RaLoRA eq. 3).

    A zero matrix has no distribution; its effective rank is returned as NaN.
    """
    total = sv.sum(-1, keepdim=True)
    p = sv / total
    plogp = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
    erank = torch.exp(-plogp.sum(-1))
    return torch.where(total.squeeze(-1) > 0, erank, torch.full_like(erank, float("nan")))


def _check(grads: Sequence[torch.Tensor], noises: Sequence[torch.Tensor] | None) -> None:
    for g in grads:
        if g.dim() != 2:
            raise ValueError(f"effective rank needs 2-D matrices, got shape {tuple(g.shape)}")
    if noises is None:
        return
    if len(noises) != len(grads):
        raise ValueError(
            f"got {len(noises)} noise estimates for {len(grads)} gradients; pass one D per G"
        )
    for i, (g, d) in enumerate(zip(grads, noises)):
        if tuple(d.shape) != tuple(g.shape):
            raise ValueError(
                f"noise estimate {i} has shape {tuple(d.shape)} but its gradient "
                f"{tuple(g.shape)}; pass D with the gradient's shape"
            )


def effective_ranks(
    grads: Sequence[torch.Tensor],
    noises: Sequence[torch.Tensor] | None = None,
    max_batch_bytes: int = 2**30,
    device: torch.device | str | None = None,
) -> list[float]:
    """Effective rank (RaLoRA eq. 3) of each 2-D gradient, in input order (NaN if all-zero).

    ``noises``: the probe's noise estimate ``D`` for each gradient (same shapes); then the
    *signal* effective rank, from the clipped eigenvalues of ``G Gᵀ − D Dᵀ`` (METHODS.md §2,
    probe noise); NaN where no signal is left (all eigenvalues ≤ 0). Same-shape gradients are
    stacked and processed together, at most ``max_batch_bytes`` of float64 at a time so that
    memory stays bounded on large models. ``device``: where to compute (default: where each
    gradient lives). Raises ValueError on a non-2-D matrix or a noise list that does not match.
    """
    _check(grads, noises)
    out: list[float] = [float("nan")] * len(grads)
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, g in enumerate(grads):
        by_shape[(tuple(g.shape), g.device if device is None else torch.device(device))].append(i)
    copies = 1 if noises is None else 2
    for (shape, dev), idx in by_shape.items():
        per = 8 * shape[0] * shape[1] * copies + 8 * min(shape) ** 2 * copies
        chunk = max(1, max_batch_bytes // per)
        for start in range(0, len(idx), chunk):
            part = idx[start : start + chunk]
            batch = torch.stack([grads[i].to(dev) for i in part])  # (b, d_out, d_in)
            noise = None if noises is None else torch.stack([noises[i].to(dev) for i in part])
            eranks = erank_from_singular_values(singular_values(batch, noise))
            for i, e in zip(part, eranks.tolist()):
                out[i] = e
    return out

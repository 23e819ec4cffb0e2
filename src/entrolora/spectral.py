"""Effective rank (gradient intrinsic dimensionality, RaLoRA eq. 3) computed batched.

Singular values come from the eigenvalues of the smaller Gram matrix (``G Gᵀ`` or ``Gᵀ G``) in
float64: one batched matmul and one batched ``eigvalsh`` per group of same-shape gradients, on
whatever device the gradients live. Squaring doubles the condition number, but the directions it
blurs have singular values below ~1e-8·σ_max, whose weight in the L1-normalised distribution is
negligible, so the result stays within 1 % of a float64 SVD.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch


def singular_values(grads: torch.Tensor) -> torch.Tensor:
    """Singular values of a batch ``(b, m, n)``: float64, descending, shape ``(b, min(m, n))``."""
    g = grads.to(torch.float64)
    # Gram of the smaller side: (b, k, k) with k = min(m, n)
    gram = g @ g.mT if g.shape[-2] <= g.shape[-1] else g.mT @ g
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


def effective_ranks(
    grads: Sequence[torch.Tensor],
    max_batch_bytes: int = 2**30,
    device: torch.device | str | None = None,
) -> list[float]:
    """Effective rank (RaLoRA eq. 3) of each 2-D gradient, in input order (NaN if all-zero).

    Same-shape gradients are stacked and processed together, at most ``max_batch_bytes`` of
    float64 at a time so that memory stays bounded on large models. ``device``: where to compute
    (default: where each gradient lives).
    """
    out: list[float] = [float("nan")] * len(grads)
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, g in enumerate(grads):
        if g.dim() != 2:
            raise ValueError(f"effective rank needs 2-D matrices, got shape {tuple(g.shape)}")
        by_shape[(tuple(g.shape), g.device if device is None else torch.device(device))].append(i)
    for (shape, dev), idx in by_shape.items():
        per = 8 * shape[0] * shape[1] + 8 * min(shape) ** 2
        chunk = max(1, max_batch_bytes // per)
        for start in range(0, len(idx), chunk):
            part = idx[start : start + chunk]
            batch = torch.stack([grads[i].to(dev) for i in part])  # (b, d_out, d_in)
            eranks = erank_from_singular_values(singular_values(batch))
            for i, e in zip(part, eranks.tolist()):
                out[i] = e
    return out

"""Exact singular values of batched gradients, from float64 Gram eigenvalues, and the effective
rank of a singular spectrum (RaLoRA eq. 3): what ``spectral`` computes exactly and what ``slq``'s
estimator falls back to.
"""

from __future__ import annotations

import torch


def gram(g: torch.Tensor) -> torch.Tensor:
    """Float64 Gram ``g gᵀ`` or ``gᵀ g`` on the smaller side of a batch ``(b, m, n)``:
    ``(b, k, k)``, k = min(m, n)."""
    g = g.to(torch.float64)
    return g @ g.mT if g.shape[-2] <= g.shape[-1] else g.mT @ g


def singular_values(grads: torch.Tensor, noises: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values of a batch ``(b, m, n)``: float64, descending, shape ``(b, min(m, n))``.

    With ``noises`` (same shape), those of the signal: square roots of the eigenvalues of
    ``G Gᵀ − D Dᵀ`` (smaller side) clipped at 0 (METHODS.md §2, probe noise).
    """
    m = gram(grads)
    if noises is not None:
        m = m - gram(noises)  # eigvalsh reads one triangle: no symmetrising needed
    return sqrt_eig(m)


def sqrt_eig(gram: torch.Tensor) -> torch.Tensor:
    """Square roots of the eigenvalues (clipped at 0) of symmetric matrices, descending."""
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(-1)  # eigvalsh: ascending


def erank_from_singular_values(sv: torch.Tensor) -> torch.Tensor:
    """``exp(−Σ p_i log p_i)``, ``p_i = σ_i / Σσ_j`` over the last dim (RaLoRA eq. 3).

    A zero matrix has no distribution; its effective rank is returned as NaN.
    """
    total = sv.sum(-1, keepdim=True)
    p = sv / total
    plogp = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
    erank = torch.exp(-plogp.sum(-1))
    return torch.where(total.squeeze(-1) > 0, erank, torch.full_like(erank, float("nan")))

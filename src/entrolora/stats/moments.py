"""Moment-based statistics (METHODS.md §2): proxy entropy, signal variance, similarity matrices.

RMI (E²LoRA eq. 3) and KL need only each module's moments. Raw statistics read the moments of
``G``; signal statistics (METHODS.md §2, "Probe noise") replace every variance by the signal
variance ``var(G) − var(D)`` clipped at the floor ``2·var(D)/√n``, and debias the squared
difference of two modules' means in their joint variance (docs/methods.md §2 derives both).
``cosine``, ``l1``, ``l2`` compare the kept gradients as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .module import ModuleStats

HALF_LOG_2PI_PLUS_HALF = 0.5 * math.log(2 * math.pi) + 0.5
REFERENCE_SIGMA = 1e-3
TINY = torch.finfo(torch.float64).tiny


def signal_variance(var_g: float, var_d: float, n: int) -> float:
    """Signal variance ``max(var_G − var_D, 2·var_D/√n)`` (METHODS.md §2, probe noise).

    ``var_G`` and ``var_D`` are population variances (ddof = 0) of the ``n`` elements of ``G``
    and of the noise estimate ``D``. The difference is unbiased for the elements' variance of the
    true mean gradient; the floor is its standard error if the noise were white (the finest
    resolution a probe can have), so that a module without detectable signal keeps a finite
    entropy just below what the probe resolves. With ``var_D = 0`` it is ``var_G``.
    """
    return max(var_g - var_d, 2.0 * var_d / math.sqrt(n))


def proxy_entropy(sigma: float) -> float:
    """Proxy entropy ``log σ + ½ log 2π + ½`` (E²LoRA eq. 1); σ must be > 0."""
    return math.log(sigma) + HALF_LOG_2PI_PLUS_HALF


def moments(g: torch.Tensor) -> tuple[float, float]:
    """``(mean, population std)`` of all elements of ``g`` in float64."""
    g64 = g.detach().to(torch.float64)
    mean = g64.mean()
    std = (g64 - mean).square().mean().sqrt()  # population std (ddof = 0)
    return float(mean), float(std)


def signal_fields(
    n: int, g: tuple[float, float], d: tuple[float, float] | None, erank: float | None
) -> dict:
    """ModuleStats' noise and signal fields from the moments ``(mean, std)`` of G and D (§2)."""
    if d is None:
        return {}
    (mu_g, sd_g), (mu_d, sd_d) = g, d
    energy_g, energy_d = sd_g**2 + mu_g**2, sd_d**2 + mu_d**2  # ‖·‖²_F / n
    snr = max(energy_g - energy_d, 0.0) / energy_d if energy_d > 0 else math.inf
    live = sd_g > 0
    sd_s = math.sqrt(signal_variance(sd_g**2, sd_d**2, n)) if live else 0.0
    return {
        "noise_mean": mu_d,
        "noise_std": sd_d,
        "snr": snr,
        "signal_std": sd_s,
        "signal_entropy": proxy_entropy(sd_s) if live else None,
        "signal_erank": erank if live and erank is not None and math.isfinite(erank) else None,
    }


def _column(mods: Sequence[ModuleStats], attr: str, default: float = 0.0) -> torch.Tensor:
    vals = [getattr(m, attr) for m in mods]
    return torch.tensor([default if v is None else float(v) for v in vals], dtype=torch.float64)


def rmi_matrix(
    mods: Sequence[ModuleStats], live: Sequence[bool], scale: str, statistics: str
) -> torch.Tensor:
    """RMI (E²LoRA eq. 3) of the type's modules from counts and moments; unit diagonal not set.

    ``scale="reference"`` multiplies every moment by one factor so that the live modules'
    geometric-mean σ (signal σ under ``statistics="signal"``) is 1e-3; ``"raw"`` is literal.
    The joint variance of modules i and j is the within part ``(n_i σ_i² + n_j σ_j²)/n`` plus
    the between part ``n_i n_j (μ_i − μ_j)²/n²`` (the §2 pooled moments, rearranged); for the
    signal, σ is the clipped signal σ and ``(μ_i − μ_j)²`` is debiased by the noise estimates'
    ``(μ^D_i − μ^D_j)²`` and clipped at 0, so that identical modules keep RMI = 1.
    """
    n = _column(mods, "numel")
    mu = _column(mods, "mean")
    signal = statistics == "signal"
    sd = _column(mods, "signal_std" if signal else "std")
    mu_d = _column(mods, "noise_mean") if signal else torch.zeros_like(mu)
    return rmi_from_moments(n, mu, sd, mu_d, torch.tensor(list(live), dtype=torch.bool), scale)


def rmi_from_moments(
    n: torch.Tensor,
    mu: torch.Tensor,
    sd: torch.Tensor,
    mu_d: torch.Tensor,
    live: torch.Tensor,
    scale: str,
) -> torch.Tensor:
    """RMI (eq. 3) of N modules from their counts, means, σ (signal σ for the signal reading)
    and noise means (zeros for the raw reading), as ``rmi_matrix`` describes; unit diagonal not
    set, degenerate modules not masked. Differentiable (``margin_noise`` takes its Jacobian)."""
    if scale == "reference" and bool(live.any()):
        c = REFERENCE_SIGMA / torch.exp(torch.log(sd[live]).mean())
        mu, sd, mu_d = mu * c, sd * c, mu_d * c
    h = torch.log(torch.where(sd > 0, sd, torch.ones_like(sd))) + HALF_LOG_2PI_PLUS_HALF
    ni, nj = n[:, None], n[None, :]
    tot = ni + nj
    within = (ni * sd[:, None] ** 2 + nj * sd[None, :] ** 2) / tot
    between = (mu[:, None] - mu[None, :]) ** 2 - (mu_d[:, None] - mu_d[None, :]) ** 2
    var_ij = within + ni * nj / tot**2 * between.clamp_min(0.0)
    h_ij = 0.5 * torch.log(var_ij.clamp_min(TINY)) + HALF_LOG_2PI_PLUS_HALF
    denom = torch.minimum(h[:, None], h[None, :])
    return (h[:, None] + h[None, :] - h_ij) / denom


def kl_similarity(mods: Sequence[ModuleStats], statistics: str) -> torch.Tensor:
    """``exp(−½(KL(i‖j) + KL(j‖i)))`` between fitted Gaussians ``N(μ, σ²)`` (σ of the signal
    under ``statistics="signal"``)."""
    mu = _column(mods, "mean")
    sd = _column(mods, "signal_std" if statistics == "signal" else "std", default=1.0)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    var = sd**2
    dmu2 = (mu[:, None] - mu[None, :]) ** 2
    # KL(N_i ‖ N_j) = log(σ_j/σ_i) + (σ_i² + (μ_i−μ_j)²)/(2σ_j²) − ½
    kl = torch.log(sd[None, :] / sd[:, None]) + (var[:, None] + dmu2) / (2 * var[None, :]) - 0.5
    return torch.exp(-0.5 * (kl + kl.T))


def gradient_similarity(grads: Sequence[torch.Tensor], kind: str) -> torch.Tensor:
    """``cosine``, ``l1`` (``1/(1+mean|G_i−G_j|)``) or ``l2`` (``1/(1+‖G_i−G_j‖/√n)``)."""
    g = torch.stack([t.reshape(-1) for t in grads]).to(torch.float64)
    if kind == "cosine":
        unit = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return unit @ unit.T
    p = 1 if kind == "l1" else 2
    dist = torch.cdist(g, g, p=p, compute_mode="donot_use_mm_for_euclid_dist")
    return 1.0 / (1.0 + dist / (g.shape[1] if p == 1 else math.sqrt(g.shape[1])))

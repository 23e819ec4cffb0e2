"""One probe's standard deviation of every margin ``sim[c][s] − τ_s`` of E²LoRA's partition.

The RMI matrix (METHODS.md §2, ``moments.rmi_matrix``) is a smooth function of each module's
mean ``m₁`` and mean of squares ``m₂`` (the noise estimate's moments held fixed). Its Jacobian
``J`` (autograd, float64) and the probe's sampling covariance ``C`` of ``(m₁, m₂)`` per type
(``probing/moments.py``, stored in ``GradientStats.moment_cov``) give, by the delta method, the
variance ``gᵀ C g`` of each margin, ``g = J[c, s] − mean_{k≠s} J[s, k]`` (or ``J[c, s]`` for a
constant threshold). Through the entropies: ``H = log σ + const``, the joint entropy from the
pooled moments, the ``reference`` scale's geometric mean and, for the signal reading, the
clipped signal variance ``max(m₂ − m₁² − var_D, 2·var_D/√n)``. ``TypeMoments`` serves the
same delta method for any smooth function of a type's moments (bench/stability/rank_noise.py:
HRA's shares).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .moments import TINY, rmi_from_moments

if TYPE_CHECKING:
    from .gradient_stats import GradientStats


@dataclass(frozen=True)
class TypeMoments:
    """One module type's moments as the delta method reads them (float64, N modules).

    ``theta``: every module's mean ``m₁`` then its mean of squares ``m₂`` (2N); ``cov``: the
    probe's sampling covariance of ``theta`` (2N × 2N); ``n``: elements per module; ``var_d``,
    ``mean_d``: the noise estimate's variance and mean (zeros for the raw reading); ``live``:
    not degenerate; ``signal``: whether the signal reading's clipped variance applies.
    """

    theta: torch.Tensor
    cov: torch.Tensor
    n: torch.Tensor
    var_d: torch.Tensor
    mean_d: torch.Tensor
    live: torch.Tensor
    signal: bool

    def sigma(self, theta: torch.Tensor) -> torch.Tensor:
        """Each module's σ at moments ``theta``: ``√(m₂ − m₁²)``, for the signal reading the
        clipped ``√max(m₂ − m₁² − var_D, 2·var_D/√n)``; 1 for a degenerate module."""
        k = self.n.numel()
        var = theta[k:] - theta[:k] ** 2
        if self.signal:
            var = torch.maximum(var - self.var_d, 2.0 * self.var_d / self.n.sqrt())
        return torch.where(self.live, var.clamp_min(TINY).sqrt(), torch.ones_like(var))

    def jacobian(self, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``∂f(theta)/∂theta`` (autograd, float64): trailing dimension 2N."""
        # the moments are ~1e-6: differentiate in units of each one's own size, then scale back
        k = self.n.numel()
        unit = self.theta.abs().clamp_min(TINY)
        unit[:k] = torch.sqrt(self.theta[k:]).clamp_min(TINY)  # a mean's natural size: its rms
        jac = torch.autograd.functional.jacobian(
            lambda x: f(self.theta + x * unit), torch.zeros_like(self.theta)
        )
        return jac / unit


def type_moments(stats: GradientStats, module_type: str, statistics: str) -> TypeMoments | None:
    """The type's ``TypeMoments``; None when the statistics hold no moment covariance for it (a
    probe before issue 33, one of fewer than three batches, or statistics built from gradients
    alone). ValueError when the stored covariance does not fit the type."""
    cov = (stats.moment_cov or {}).get(module_type)
    if cov is None:
        return None
    mods = [stats.modules[name] for name in stats.types[module_type]]
    k = len(mods)
    c = torch.tensor(cov, dtype=torch.float64)
    if tuple(c.shape) != (2 * k, 2 * k):
        raise ValueError(
            f"moment_cov of {module_type!r} is {tuple(c.shape)}, not {(2 * k, 2 * k)}: the "
            "statistics file is inconsistent; probe again"
        )

    def col(values: list) -> torch.Tensor:
        return torch.tensor([0.0 if v is None else float(v) for v in values], dtype=torch.float64)

    signal = statistics == "signal"
    return TypeMoments(
        theta=torch.cat([col([m.mean for m in mods]), col([m.std**2 + m.mean**2 for m in mods])]),
        cov=c,
        n=col([m.numel for m in mods]),
        var_d=col([m.noise_std**2 if signal else 0.0 for m in mods]),
        mean_d=col([m.noise_mean if signal else 0.0 for m in mods]),
        live=torch.tensor([not m.degenerate for m in mods]),
        signal=signal,
    )


def rmi_of_moments(tm: TypeMoments, theta: torch.Tensor, scale: str) -> torch.Tensor:
    """RMI (eq. 3) of the type's N modules at moments ``theta``; diagonal 1.

    ``moments.rmi_from_moments`` of the moments ``theta`` gives (the same as ``moments.rmi_matrix``,
    checked by a test), so that autograd can take its Jacobian.
    """
    k = tm.n.numel()
    sim = rmi_from_moments(tm.n, theta[:k], tm.sigma(theta), tm.mean_d, tm.live, scale)
    both = tm.live[:, None] & tm.live[None, :]
    sim = torch.where(both, sim, torch.zeros_like(sim))
    eye = torch.eye(k, dtype=torch.bool)
    return torch.where(eye, torch.ones_like(sim), sim)


def margin_sd(
    stats: GradientStats,
    module_type: str,
    rmi_scale: str = "reference",
    statistics: str = "signal",
    threshold: float | None = None,
) -> torch.Tensor | None:
    """``(N × N)`` float64: entry ``[s, c]`` is the sd of the margin ``RMI(c, s) − τ_s``.

    ``τ_s`` is Algorithm 2's adaptive mean of row s, or the constant ``threshold``. None when
    the statistics hold no moment covariance for the type (``type_moments``).
    """
    tm = type_moments(stats, module_type, statistics)
    if tm is None:
        return None
    k = tm.n.numel()
    jac = tm.jacobian(lambda theta: rmi_of_moments(tm, theta, rmi_scale))  # (N, N, 2N)
    if threshold is None:
        off = ~torch.eye(k, dtype=torch.bool)
        row_mean = (jac * off[:, :, None]).sum(1) / max(k - 1, 1)  # (N, 2N): dτ_s
        grad = jac.transpose(0, 1) - row_mean[:, None, :]  # [s, c]: d(sim[c, s] − τ_s)
    else:
        grad = jac.transpose(0, 1)
    var = torch.einsum("scp,pq,scq->sc", grad, tm.cov, grad).clamp_min(0.0)
    return var.sqrt()


def decide_steps(steps: int, z: float, sd: float, margin: float) -> float:
    """Probe size at which ``|margin|`` would be ``z`` sd away (sd falls as ``1/√S``)."""
    return math.inf if margin == 0 else steps * (z * sd / abs(margin)) ** 2


__all__ = ["TypeMoments", "decide_steps", "margin_sd", "rmi_of_moments", "type_moments"]

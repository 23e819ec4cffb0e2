"""Sampling noise of each module's moments from one probe (docs/methods.md, "The gate").

E²LoRA's partition reads every module's mean ``m₁ = mean(G)`` and second moment
``m₂ = mean(G²)``. Both are smooth functions of ``G = (1/S)·Σ_b g_b``, so to first order (the
delta method) their sampling noise is that of the per-batch *influence* scalars

    u_b = mean(g_b)                  (δm₁ = mean_b δu_b)
    w_b = ⟨g_b, μ⟩ / n               (δm₂ ≈ 2·mean_b δw_b, μ the true mean gradient)

whose covariance across batches, over all modules of the model at once, captures the noise's
correlations across elements (real probe noise is nearly low-rank) and across modules (the same
batches drive every layer). ``w_b`` needs ``μ``, known only at the end; but ``E[⟨g_b, g_b'⟩
⟨g_b, g_b''⟩] = μᵀ(Σ + μμᵀ)μ`` for three distinct batches, so the dot products of each batch's
gradient with the two half-sums accumulated *before* it (even batches ``A_b``, odd ``C_b``) give
an unbiased U-statistic of ``E[w_b w'_b]`` with no extra accumulator and no second pass:

    E[a_b c'_b] = nE_b·nO_b·E[w w'],      a_b = ⟨g_b, A_b⟩/n, c_b = ⟨g_b, C_b⟩/n

(``nE_b``, ``nO_b``: the batches in each half before b). Per batch and distinct weight this costs
two dot products and one sum (float32, on the weight's device), folded at the end of the step
into P×P float64 sums (P distinct target weights). The second-order terms of ``m₂``'s noise
(``‖e‖² − E‖e‖²``) are left out: their variance is about ``1/SNR`` of the first-order one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass
class BatchMoments:
    """Sums over the probe's batches of the influence scalars' products (all distinct weights).

    ``suu = Σ u uᵀ``, ``su = Σ u``, ``sac = Σ (a cᵀ + c aᵀ)/2`` with weight ``w_ac = Σ nE·nO``,
    ``sua = Σ u (a + c)ᵀ`` with weight ``w_u = Σ (nE + nO)``; ``steps`` the batches.
    """

    suu: torch.Tensor
    su: torch.Tensor
    sac: torch.Tensor
    sua: torch.Tensor
    w_ac: float
    w_u: float
    steps: int

    def tensors(self) -> list[torch.Tensor]:
        return [self.suu, self.su, self.sac, self.sua]


class MomentTracker:
    """Collects ``u_b, a_b, c_b`` of every distinct weight during a step, folds them at its end."""

    def __init__(self, count: int, device: torch.device | str) -> None:
        z = dict(dtype=torch.float64, device=device)
        self.device = torch.device(device)
        self.step_vals = torch.zeros(3, count, **z)  # rows: u, a, c of the current step
        self.sums = BatchMoments(
            torch.zeros(count, count, **z), torch.zeros(count, **z),
            torch.zeros(count, count, **z), torch.zeros(count, count, **z), 0.0, 0.0, 0,
        )  # fmt: skip
        self.counts = [0, 0]

    def observe(self, i: int, g: torch.Tensor, even: torch.Tensor, odd: torch.Tensor) -> None:
        """Weight ``i``'s gradient ``g`` of this step, before it is added to either half-sum."""
        flat = (g if g.dtype == even.dtype else g.to(even.dtype)).reshape(-1)
        n = flat.numel()
        vals = torch.stack(
            [flat.sum(), torch.dot(flat, even.reshape(-1)), torch.dot(flat, odd.reshape(-1))]
        )
        self.step_vals[:, i] = vals.to(self.device, torch.float64, non_blocking=True) / n

    def end_step(self, half: int) -> None:
        u, a, c = self.step_vals
        s = self.sums
        s.suu.add_(torch.outer(u, u))
        s.su.add_(u)
        s.sac.add_(0.5 * (torch.outer(a, c) + torch.outer(c, a)))
        s.sua.add_(torch.outer(u, a + c))
        ne, no = self.counts
        s.w_ac += ne * no
        s.w_u += ne + no
        s.steps += 1
        self.counts[half] += 1
        self.step_vals.zero_()


def moment_covariance(
    bm: BatchMoments,
    slots: Sequence[int],
    mean: Sequence[float],
    energy: Sequence[float],
) -> torch.Tensor | None:
    """Covariance ``(2N × 2N)`` of the estimates ``(m₁ of each module, m₂ of each module)``.

    ``slots``: each module's distinct-weight index in ``bm``; ``mean``: its ``m₁``; ``energy``:
    its signal energy ``‖μ‖²/n`` (``m₂(G) − m₂(D)``, unbiased). Blocks: ``Cov(u)/S``,
    ``2·Cov(u, w)/S``, ``4·Cov(w)/S``; projected onto the positive semidefinite cone (the
    U-statistics are unbiased, not positive). None below three batches (no pair before a batch).
    """
    steps = bm.steps
    if steps < 3 or bm.w_ac <= 0 or bm.w_u <= 0:
        return None
    idx = torch.tensor(list(slots))
    n = len(slots)
    m1 = torch.tensor(list(mean), dtype=torch.float64)
    p = torch.tensor(list(energy), dtype=torch.float64)
    su = bm.su.cpu()[idx]
    cuu = (bm.suu.cpu()[idx][:, idx] - torch.outer(su, su) / steps) / (steps - 1)
    cww = bm.sac.cpu()[idx][:, idx] / bm.w_ac - torch.outer(p, p)
    cuw = bm.sua.cpu()[idx][:, idx] / bm.w_u - torch.outer(m1, p)
    cov = torch.zeros(2 * n, 2 * n, dtype=torch.float64)
    cov[:n, :n] = cuu
    cov[:n, n:] = 2 * cuw
    cov[n:, :n] = 2 * cuw.T
    cov[n:, n:] = 4 * cww
    cov = 0.5 * (cov + cov.T) / steps
    vals, vecs = torch.linalg.eigh(cov)
    return (vecs * vals.clamp_min(0.0)) @ vecs.T


def all_reduce_moments(bm: BatchMoments, reduce_sum) -> None:
    """Sum ``bm`` over processes in place with ``reduce_sum(tensor)`` (the probe's all-reduce)."""
    for t in bm.tensors():
        reduce_sum(t)
    scalars = torch.tensor([bm.w_ac, bm.w_u, float(bm.steps)], dtype=torch.float64)
    reduce_sum(scalars)
    bm.w_ac, bm.w_u, bm.steps = float(scalars[0]), float(scalars[1]), int(scalars[2])


def type_covariances(
    modules: Mapping, types: Mapping[str, list[str]], slot_of: Mapping[str, int], bm: BatchMoments
) -> dict[str, list[list[float]]]:
    """``{module type: 2N × 2N covariance of (m₁, m₂) of its modules, by layer}`` (JSON-able)."""
    out = {}
    for t, names in types.items():
        mods = [modules[n] for n in names]
        energy = [_energy(m) for m in mods]
        cov = moment_covariance(bm, [slot_of[n] for n in names], [m.mean for m in mods], energy)
        if cov is not None:
            out[t] = cov.tolist()
    return out


def _energy(m) -> float:
    """Signal energy per element ``max(m₂(G) − m₂(D), 0)`` (``m₂(G)`` without a noise estimate)."""
    e = m.std**2 + m.mean**2
    if m.noise_std is not None:
        e -= m.noise_std**2 + m.noise_mean**2
    return max(e, 0.0)


__all__ = ["BatchMoments", "MomentTracker", "moment_covariance", "type_covariances"]

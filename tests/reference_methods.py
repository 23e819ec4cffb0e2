"""An independent float64 numpy reading of shared/METHODS.md §2–4, for tests only.

Written from the text, not from the planners: it imports nothing from entrolora. Joint entropies
are computed by actually concatenating gradients (the text's closed form is only checked against
it), singular values by ``numpy.linalg.svd``, partitions and ranks by the literal loops.

The one convention shared with the planners on purpose (docs/methods.md "Ties"): a similarity
within 1e-9 (relative) of a threshold counts as equal, a GID within 1e-9 (relative) of
``r·2^k`` counts as ``r·2^k``, and fractional parts within 1e-9 tie.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

C = 0.5 * math.log(2 * math.pi) + 0.5
TOL = 1e-9


# -- §2 statistics --------------------------------------------------------------------------------
def entropy(g: np.ndarray) -> float:
    """Proxy entropy ``log σ + ½ log 2π + ½``, population σ."""
    return math.log(float(np.asarray(g, np.float64).std())) + C


def joint_entropy(gi: np.ndarray, gj: np.ndarray) -> float:
    both = np.concatenate([np.ravel(gi), np.ravel(gj)]).astype(np.float64)
    return entropy(both)


def rmi_matrix(grads: list[np.ndarray], scale: str = "reference") -> np.ndarray:
    """RMI (eq. 3) by concatenation; reference scale: common factor to geometric-mean σ 1e-3."""
    gs = [np.asarray(g, np.float64) for g in grads]
    live = [float(g.std()) > 0 for g in gs]
    if scale == "reference" and any(live):
        geo = math.exp(np.mean([math.log(float(g.std())) for g, ok in zip(gs, live) if ok]))
        gs = [g * (1e-3 / geo) for g in gs]
    n = len(gs)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i == j:
                out[i, j] = 1.0
            elif live[i] and live[j]:
                hi, hj = entropy(gs[i]), entropy(gs[j])
                out[i, j] = (hi + hj - joint_entropy(gs[i], gs[j])) / min(hi, hj)
    return out


def rmi_from_moments(
    counts: list[int], means: list[float], stds: list[float], scale: str = "reference"
) -> np.ndarray:
    """RMI from (n, μ, σ) with the pooled-moment joint entropy of §2 (for ModuleStats-only data)."""
    n_ = np.asarray(counts, np.float64)
    mu = np.asarray(means, np.float64)
    sd = np.asarray(stds, np.float64)
    live = sd > 0
    if scale == "reference" and live.any():
        c = 1e-3 / math.exp(np.log(sd[live]).mean())
        mu, sd = mu * c, sd * c
    k = len(n_)
    out = np.eye(k)
    for i in range(k):
        for j in range(k):
            if i == j or not (live[i] and live[j]):
                continue
            hi, hj = math.log(sd[i]) + C, math.log(sd[j]) + C
            m = (n_[i] * mu[i] + n_[j] * mu[j]) / (n_[i] + n_[j])
            second = (n_[i] * (sd[i] ** 2 + mu[i] ** 2) + n_[j] * (sd[j] ** 2 + mu[j] ** 2)) / (
                n_[i] + n_[j]
            )
            hij = 0.5 * math.log(second - m * m) + C
            out[i, j] = (hi + hj - hij) / min(hi, hj)
    return out


def erank(g: np.ndarray) -> float:
    """``exp(−Σ p log p)``, ``p = σ_i / Σσ`` over float64 SVD singular values."""
    s = np.linalg.svd(np.asarray(g, np.float64), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(math.exp(-(p * np.log(p)).sum()))


def sensitivity(w: np.ndarray, g: np.ndarray) -> float:
    return float(np.abs(np.asarray(w, np.float64) * np.asarray(g, np.float64)).mean())


# -- §2 probe noise: statistics of the signal ---------------------------------------------------
def halves(first: np.ndarray, second: np.ndarray, n1: int, n2: int):
    """``(G, D)`` from two half means: ``G = (n₁G₁ + n₂G₂)/S``, ``D = √(n₁n₂)/S·(G₁ − G₂)``."""
    a, b = np.asarray(first, np.float64), np.asarray(second, np.float64)
    total = n1 + n2
    return (n1 * a + n2 * b) / total, math.sqrt(n1 * n2) / total * (a - b)


def signal_variance(g: np.ndarray, d: np.ndarray) -> float:
    """``max(var G − var D, 2·var D/√n)`` (docs/methods.md §2)."""
    g, d = np.ravel(np.asarray(g, np.float64)), np.ravel(np.asarray(d, np.float64))
    return max(float(g.var() - d.var()), 2.0 * float(d.var()) / math.sqrt(g.size))


def signal_eigenvalues(g: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Eigenvalues of ``GGᵀ − DDᵀ`` on the smaller side, by numpy's eigvalsh, ascending."""
    g, d = np.asarray(g, np.float64), np.asarray(d, np.float64)
    if g.shape[0] > g.shape[1]:
        g, d = g.T, d.T
    return np.linalg.eigvalsh(g @ g.T - d @ d.T)


def signal_erank(g: np.ndarray, d: np.ndarray) -> float | None:
    """Effective rank of the signal (§2): eigenvalues of ``GGᵀ − DDᵀ`` clipped at 0, their
    square roots as singular values; None when none is positive."""
    lam = signal_eigenvalues(g, d)
    s = np.sqrt(np.clip(lam, 0, None))
    if s.sum() <= 0:
        return None
    p = s / s.sum()
    p = p[p > 0]
    return float(math.exp(-(p * np.log(p)).sum()))


def signal_stats(g: np.ndarray, d: np.ndarray) -> dict:
    """The noise and signal fields of one module from ``G`` and ``D`` in float64 numpy."""
    g64, d64 = np.asarray(g, np.float64), np.asarray(d, np.float64)
    eg, ed = float((g64**2).sum()), float((d64**2).sum())
    sd = math.sqrt(signal_variance(g64, d64))
    return {
        "noise_mean": float(d64.mean()),
        "noise_std": float(d64.std()),
        "snr": max(eg - ed, 0.0) / ed if ed > 0 else math.inf,
        "signal_std": sd,
        "signal_entropy": math.log(sd) + C,
        "signal_erank": signal_erank(g64, d64),
    }


def signal_rmi_matrix(
    grads: list[np.ndarray], noises: list[np.ndarray], scale: str = "reference"
) -> np.ndarray:
    """RMI of the signal: module entropies from the signal variance; the joint variance of i, j
    is the size-weighted mean of their signal variances plus ``n_i n_j/n²`` times the squared
    difference of their means minus that of their noise means (clipped at 0)."""
    gs = [np.ravel(np.asarray(g, np.float64)) for g in grads]
    ds = [np.ravel(np.asarray(d, np.float64)) for d in noises]
    var = [signal_variance(g, d) for g, d in zip(gs, ds)]
    c = 1.0
    if scale == "reference":
        c = 1e-3 / math.exp(np.mean([0.5 * math.log(v) for v in var]))
    k = len(gs)
    out = np.eye(k)
    for i in range(k):
        for j in range(k):
            if i == j:
                continue
            ni, nj = gs[i].size, gs[j].size
            n = ni + nj
            between = (gs[i].mean() - gs[j].mean()) ** 2 - (ds[i].mean() - ds[j].mean()) ** 2
            joint = (ni * var[i] + nj * var[j]) / n + ni * nj / n**2 * max(between, 0.0)
            hi, hj = 0.5 * math.log(c * c * var[i]) + C, 0.5 * math.log(c * c * var[j]) + C
            hij = 0.5 * math.log(c * c * joint) + C
            out[i, j] = (hi + hj - hij) / min(hi, hj)
    return out


# -- §3 E²LoRA --------------------------------------------------------------------------------
def greedy(sim: np.ndarray, degenerate: list[bool] | None = None, threshold=None):
    """Algorithm 2; degenerate layers are singletons. Returns ``(intervals, thresholds)``."""
    n = sim.shape[0]
    degenerate = degenerate or [False] * n
    intervals, taus = [], []
    p = 0
    while p < n:
        s = p
        if degenerate[s]:
            intervals.append((s, s))
            taus.append(None)
            p += 1
            continue
        if threshold is not None:
            tau = threshold
        elif n == 1:
            tau = 1.0
        else:
            tau = float(np.mean([sim[s, k] for k in range(n) if k != s]))
        e = s
        while e + 1 < n and not degenerate[e + 1] and sim[e + 1, s] >= tau - TOL * max(1, abs(tau)):
            e += 1
        intervals.append((s, e))
        taus.append(tau)
        p = e + 1
    return intervals, taus


def dp(sim: np.ndarray, lam: float, degenerate: list[bool] | None = None):
    """Appendix G by exhaustive search over all 2^(N−1) partitions (small N only)."""
    n = sim.shape[0]
    degenerate = degenerate or [False] * n
    best, best_parts = math.inf, None
    for mask in range(2 ** (n - 1)):
        cuts = [i + 1 for i in range(n - 1) if mask >> i & 1]
        bounds = [0, *cuts, n]
        parts = [(bounds[k], bounds[k + 1] - 1) for k in range(len(bounds) - 1)]
        if any(e > s and any(degenerate[s : e + 1]) for s, e in parts):
            continue
        cost = sum(-sim[s : e + 1, s : e + 1].mean() for s, e in parts) + lam * len(parts)
        if cost < best - 1e-7:
            best, best_parts = cost, parts
    return best_parts, best


def dp_cost(sim: np.ndarray, parts, lam: float) -> float:
    return sum(-sim[s : e + 1, s : e + 1].mean() for s, e in parts) + lam * len(parts)


def hra(entropies: list, r: int, n_layers: int, allocation="shifted", budget="intervals"):
    """Interval ranks from interval max-entropies (None = degenerate). Returns (ranks, weights)."""
    k = len(entropies)
    total = k * r if budget == "intervals" else n_layers * r
    live = [i for i in range(k) if entropies[i] is not None]
    if allocation == "uniform":
        w = {i: 1.0 for i in live}
    elif allocation == "literal":
        if any(entropies[i] < 0 for i in live):
            warnings.warn("negative entropies", UserWarning, stacklevel=2)
        w = {i: entropies[i] for i in live}
    else:
        low = min(entropies[i] for i in live) if live else 0.0
        w = {i: 1.0 + entropies[i] - low for i in live}
    ranks = [1] * k
    budget_live = total - (k - len(live))
    if not live:
        return ranks, [None] * k
    wsum = sum(w.values())
    share = {i: w[i] / wsum * budget_live for i in live}
    for i in live:
        ranks[i] = max(1, math.floor(share[i] + TOL))
    frac = {i: share[i] - math.floor(share[i] + TOL) for i in live}
    while sum(ranks) < total:
        # largest fractional part first, lower index on ties; each unit to a new interval
        candidates = sorted(live, key=lambda i: (-round(frac[i], 9), i))
        for i in candidates:
            if sum(ranks) >= total:
                break
            ranks[i] += 1
    while sum(ranks) > total:
        above = [i for i in live if ranks[i] > 1]
        top = max(ranks[i] for i in above)
        i = max(i for i in above if ranks[i] == top)
        ranks[i] -= 1
    return ranks, [w.get(i) for i in range(k)]


# -- §4 RaLoRA --------------------------------------------------------------------------------
def blocks(g: float | None, r: int, n_max: int, d_in: int, d_out: int) -> int:
    if g is None:
        return 1
    e = math.floor(math.log2(g / r) + TOL)
    e = max(0, min(e, round(math.log2(n_max))))
    n = 2**e
    while n > 1 and (d_in % n != 0 or d_out % n != 0):
        n //= 2
    return n


def pro_ranks(sens: list[float], dims: list[tuple[int, int]], r_ref: int, r_min: int, r_max: int):
    """RaLoRA-Pro eqs. 5–8 over all modules together; Python's round (half to even)."""
    alpha = np.asarray(sens, np.float64) / np.sum(sens)
    roots = np.sqrt([d_in + d_out for d_in, d_out in dims])
    p_total = float(np.sum(roots * r_ref))
    return [min(max(round(p_total * a / q), r_min), r_max) for a, q in zip(alpha, roots)]

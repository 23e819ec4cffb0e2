"""Effective rank (gradient intrinsic dimensionality, RaLoRA eq. 3) computed batched.

Singular values come from the eigenvalues of the smaller Gram matrix (``G Gᵀ`` or ``Gᵀ G``) in
float64: one batched matmul and one batched ``eigvalsh`` per group of same-shape gradients, on
whatever device the gradients live. Squaring doubles the condition number, but the directions it
blurs have singular values below ~1e-8·σ_max, whose weight in the L1-normalised distribution is
negligible, so the result stays within 1 % of a float64 SVD.

Signal effective rank (METHODS.md §2, "Probe noise"): given the probe's noise estimate ``D`` for
each gradient, the Gram of the smaller side becomes ``M = G Gᵀ − D Dᵀ`` (unbiased for ``μ μᵀ``);
``M`` is symmetric but not PSD, so its eigenvalues are clipped at 0 before the square root.

Large matrices (smaller side ≥ ``FAST_MIN_SIDE``): ``erank_estimate`` estimates the raw
statistic from products with G only (deflated stochastic Lanczos quadrature: within 1 % on a
noise floor, up to ~3 % on real gradients' steeply decaying spectra, bench/erank.py), which
avoids both the Gram product and its eigenvalues; see the comment above ``FastErank``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

# Smaller side from which ``effective_ranks`` estimates instead of computing exactly: there the
# estimator is several times faster than the Gram eigenvalues (bench/erank.py); below, exact
# is cheap and the estimator would span most of the space anyway.
FAST_MIN_SIDE = 2048


def _gram(g: torch.Tensor) -> torch.Tensor:
    """Float64 Gram ``g gᵀ`` or ``gᵀ g`` on the smaller side of a batch ``(b, m, n)``:
    ``(b, k, k)``, k = min(m, n)."""
    g = g.to(torch.float64)
    return g @ g.mT if g.shape[-2] <= g.shape[-1] else g.mT @ g


def singular_values(grads: torch.Tensor, noises: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values of a batch ``(b, m, n)``: float64, descending, shape ``(b, min(m, n))``.

    With ``noises`` (same shape), those of the signal: square roots of the eigenvalues of
    ``G Gᵀ − D Dᵀ`` (smaller side) clipped at 0 (METHODS.md §2, probe noise).
    """
    gram = _gram(grads)
    if noises is not None:
        gram = gram - _gram(noises)  # eigvalsh reads one triangle: no symmetrising needed
    return _sqrt_eig(gram)


def _sqrt_eig(gram: torch.Tensor) -> torch.Tensor:
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
    *,
    method: str = "auto",
    fast_min_side: int = FAST_MIN_SIDE,
    seed: int = 0,
) -> list[float]:
    """Effective rank (RaLoRA eq. 3) of each 2-D gradient, in input order (NaN if all-zero).

    ``noises``: the probe's noise estimate ``D`` for each gradient (same shapes); then the
    *signal* effective rank, from the clipped eigenvalues of ``G Gᵀ − D Dᵀ`` (METHODS.md §2,
    probe noise); NaN where no signal is left (all eigenvalues ≤ 0). ``method="exact"``:
    float64 Gram eigenvalues; same-shape gradients are stacked and processed together, at most
    ``max_batch_bytes`` of float64 at a time so that memory stays bounded on large models.
    ``"fast"``: ``erank_estimate`` (from products with G only, seeded by ``seed``: within 1 %
    of exact for the raw statistic on a noise floor, up to ~3 % on real gradients' steeply
    decaying spectra; a few per cent for the signal); ``"auto"`` (default): fast
    for the raw statistic where the smaller side is ≥ ``fast_min_side``, exact otherwise.
    ``device``: where to compute (default: where each gradient lives). Raises ValueError on a
    non-2-D matrix, a noise list that does not match or an unknown method.
    """
    _check(grads, noises)
    if method not in ("auto", "exact", "fast"):
        raise ValueError(f"method must be 'auto', 'exact' or 'fast', got {method!r}")
    out: list[float] = [float("nan")] * len(grads)
    copies = 1 if noises is None else 2
    for (shape, dev), idx in _shape_groups(grads, device).items():
        auto_fast = noises is None and min(shape) >= fast_min_side  # see FAST_SIGNAL
        if method == "fast" or (method == "auto" and auto_fast):
            for i in idx:
                d = None if noises is None else noises[i].to(dev)
                out[i] = erank_estimate(grads[i].to(dev), d, seed=seed)
            continue
        for part in _chunks(idx, shape, copies, copies, max_batch_bytes):
            batch, noise = _stack64(grads, part, dev), _stack64(noises, part, dev)
            eranks = erank_from_singular_values(singular_values(batch, noise))
            for i, e in zip(part, eranks.tolist()):
                out[i] = e
    return out


def raw_and_signal_eranks(
    grads: Sequence[torch.Tensor],
    noises: Sequence[torch.Tensor],
    max_batch_bytes: int = 2**30,
    device: torch.device | str | None = None,
    *,
    fast_min_side: int = FAST_MIN_SIDE,
    seed: int = 0,
) -> tuple[list[float], list[float]]:
    """``(effective_ranks(grads), effective_ranks(grads, noises))`` with the same defaults and
    the same values, for less work: each shape group is stacked and converted to float64 once,
    the signal Gram reuses the raw one (``M = G Gᵀ − D Dᵀ``) and one batched ``eigvalsh`` takes
    both. Where the raw statistic is estimated (smaller side ≥ ``fast_min_side``), only the
    signal's eigenvalues are computed exactly.
    """
    _check(grads, noises)
    raw: list[float] = [float("nan")] * len(grads)
    signal: list[float] = [float("nan")] * len(grads)
    for (shape, dev), idx in _shape_groups(grads, device).items():
        fast = min(shape) >= fast_min_side
        for part in _chunks(idx, shape, 2, 4, max_batch_bytes):  # G, D; A, DDᵀ, M, both
            g, d = _stack64(grads, part, dev), _stack64(noises, part, dev)
            a = _gram(g)  # (b, k, k)
            m = a - _gram(d)
            sv = _sqrt_eig(m if fast else torch.cat([a, m]))  # (b or 2b, k)
            eranks = erank_from_singular_values(sv).tolist()
            del g, d, a, m
            for j, i in enumerate(part):
                signal[i] = eranks[j - len(part)]
                raw[i] = erank_estimate(grads[i].to(dev), seed=seed) if fast else eranks[j]
    return raw, signal


def _shape_groups(
    grads: Sequence[torch.Tensor], device: torch.device | str | None
) -> dict[tuple[tuple[int, ...], torch.device], list[int]]:
    """Indices of the gradients per (shape, device where they are computed), in input order."""
    groups: dict[tuple[tuple[int, ...], torch.device], list[int]] = defaultdict(list)
    for i, g in enumerate(grads):
        groups[(tuple(g.shape), g.device if device is None else torch.device(device))].append(i)
    return groups


def _chunks(idx: list[int], shape: tuple[int, ...], mats: int, grams: int, max_bytes: int):
    """``idx`` in slices whose float64 stacks (``mats`` copies of the matrices, ``grams`` of
    their Grams) stay under ``max_bytes``: memory stays bounded on large models."""
    per = 8 * shape[0] * shape[1] * mats + 8 * min(shape) ** 2 * grams
    chunk = max(1, max_bytes // per)
    return [idx[start : start + chunk] for start in range(0, len(idx), chunk)]


def _stack64(mats: Sequence[torch.Tensor] | None, part: list[int], dev) -> torch.Tensor | None:
    """``mats[part]`` stacked as float64 on ``dev``: ``(b, d_out, d_in)``; None for None."""
    if mats is None:
        return None
    out = torch.empty((len(part), *mats[part[0]].shape), dtype=torch.float64, device=dev)
    for j, i in enumerate(part):
        out[j].copy_(mats[i])  # converts and moves in one pass
    return out


# -- fast estimate for large matrices -----------------------------------------------------------
# erank = exp(log S₁ − T/S₁) with S₁ = Σσ = tr f₁(A), T = Σσ log σ = tr f₂(A), where A is the
# smaller-side Gram GᵀG (or the signal Gram GᵀG − DᵀD), f₁(λ) = √λ₊ and f₂(λ) = √λ₊·log √λ₊.
# Both traces are estimated from products with G (and D) only, never forming A:
# 1. block Lanczos from a random block: Ritz pairs whose residual is below ``lock_tol``·|θ| are
#    eigenpairs to that accuracy; their f(θ) enter exactly ("deflation", as Hutch++ does with
#    its sketch). These are the large singular values that would make a stochastic estimate
#    noisy.
# 2. the rest, tr f(Ã) with Ã = (I − YYᵀ) A (I − YYᵀ): block Gauss quadrature (stochastic
#    Lanczos quadrature) from an orthonormal random block in the complement, with λ as control
#    variate: tr Ã = tr A − Σθ_locked is known exactly (tr A = ‖G‖²_F − ‖D‖²_F), so only the part
#    of f that is not linear in λ is left to the random estimate.
# Float64 throughout (the products too): A squares the condition number, and a float32 product
# would lift the ~k near-zero eigenvalues of a rank-deficient G to ~1e-7·λ_max, whose square
# roots add up to a visible share of Σσ. Deterministic given the seed.
@dataclass(frozen=True)
class FastErank:
    """Parameters of ``erank_estimate``: Lanczos ``block`` × ``steps`` for the deflation,
    ``probes`` × ``probe_steps`` for the rest (quadrature), ``lock_tol`` the relative residual
    of a locked Ritz pair, ``dtype`` of the products with G and D (the recurrences are float64),
    ``extrapolate``: Richardson-extrapolate the quadrature from probe_steps/2 and probe_steps."""

    block: int = 32
    steps: int = 6
    probes: int = 16
    probe_steps: int = 32
    lock_tol: float = 1e-3
    dtype: torch.dtype = torch.float32
    extrapolate: bool = True

    def krylov_dim(self) -> int:
        return self.block * self.steps + self.probes * self.probe_steps


# Tuned on bench/erank.py's 4096 × 4096 gradients, synthetic and with the singular values of
# real probe gradients (704 product columns for the raw statistic). Real gradients' singular
# values fall steeply towards 0, where Gauss quadrature of √λ converges slowly: with 16
# quadrature steps (within 0.12 % on the synthetic spectra) 16 of 39 real profiles were within
# 1 %, the worst 3.5 % off; with 32, 36 of 39, the worst 1.3 % (``--compare-steps 16,32``).
# The signal's f(λ) = √λ₊ has a kink at 0 inside the spectrum of G Gᵀ − D Dᵀ, where the noise
# eigenvalues cluster; its quadrature needs a wider deflation and three times the steps, and
# is still only within a few per cent (bench/erank.py) and no faster than the exact Gram
# eigenvalues on a CPU, so ``effective_ranks(method="auto")`` keeps the signal exact.
FAST_RAW = FastErank()
FAST_SIGNAL = FastErank(block=64, steps=7, probe_steps=48)


def _block_lanczos(op, start: torch.Tensor, steps: int):
    """Block Lanczos with full reorthogonalisation: ``(T, basis (k, steps·b), last coupling)``.

    ``start`` (k, b) has orthonormal columns; ``T`` is the (steps·b)² block tridiagonal matrix.
    """
    k, b = start.shape
    basis = start.new_empty(k, steps * b)
    t = start.new_zeros(steps * b, steps * b)
    basis[:, :b] = start
    coupling = None
    for j in range(steps):
        lo, hi = j * b, (j + 1) * b
        q = basis[:, lo:hi]
        w = op(q)
        a = q.mT @ w
        t[lo:hi, lo:hi] = (a + a.mT) / 2
        done = basis[:, :hi]
        for _ in range(2):  # full reorthogonalisation, twice is enough (Kahan–Parlett)
            w = w - done @ (done.mT @ w)
        q_next, coupling = torch.linalg.qr(w)
        if coupling.diagonal().abs().min() <= 1e-10 * t.abs().max():
            # breakdown (the space is exhausted, e.g. a low-rank G): QR completes a nearly zero
            # w with arbitrary vectors, which must still be orthogonal to the basis
            for _ in range(2):
                q_next = q_next - done @ (done.mT @ q_next)
            q_next = torch.linalg.qr(q_next)[0]
        if j + 1 < steps:
            basis[:, hi : hi + b] = q_next
            t[hi : hi + b, lo:hi] = coupling
            t[lo:hi, hi : hi + b] = coupling.mT
    return t, basis, coupling


def _sq(x: torch.Tensor) -> torch.Tensor:
    """``‖x‖²_F`` (= tr xᵀx): norms along x's contiguous dim in x's dtype (a transposed view is
    read in its memory order: ~10× faster), their squares summed in float64 (no float64 copy)."""
    dim = -1 if x.stride(-1) == 1 else -2
    return (torch.linalg.vector_norm(x, dim=dim).to(torch.float64) ** 2).sum()


def _f(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(√θ₊, √θ₊·log √θ₊)``: the singular value and its entropy term, 0 at θ ≤ 0."""
    s = theta.clamp_min(0).sqrt()
    return s, torch.where(s > 0, s * s.clamp_min(1e-300).log(), torch.zeros_like(s))


def _with_control_variate(w, theta, f, trace):
    """Σ w·f with λ as control variate: Σ w·(f − cλ) + c·trace, c the weighted slope of f on λ."""
    p = w / w.sum()
    mt = (p * theta).sum()
    var = (p * (theta - mt) ** 2).sum()
    c = (p * (f - (p * f).sum()) * (theta - mt)).sum() / var if var > 0 else theta.new_zeros(())
    return (w * (f - c * theta)).sum() + c * trace


def _quadrature(eig, probes: int, dim: int, trace: torch.Tensor | None):
    """``(tr f₁, tr f₂)`` over a ``dim``-dimensional space from the ``eigh`` ``eig`` of the
    block Lanczos matrix of ``probes`` orthonormal random start vectors (block Gauss
    quadrature); with ``trace`` (the exact tr of the operator there) λ is used as control
    variate."""
    theta, s = eig
    w = s[:probes].pow(2).sum(0) * (dim / probes)  # Gauss weights, Σw = dim
    f1, f2 = _f(theta)
    if trace is None:
        return (w * f1).sum(), (w * f2).sum()
    return _with_control_variate(w, theta, f1, trace), _with_control_variate(w, theta, f2, trace)


def _rounding_bound(eig, probes: int, theta: torch.Tensor, dtype) -> bool:
    """Whether over 10 % of the quadrature weight sits on |θ| below 100 roundings of λ_max.

    In float32, products of G with vectors carry errors ~u·λ_max, which move eigenvalues at 0
    to ±u·λ_max; their square roots, ~√u·σ_max each, add up when a large share of the spectrum
    is there (a rank-deficient G). Elsewhere the relative error of √λ is below u·λ_max/λ.
    ``eig``: ``eigh`` of the block Lanczos matrix of ``probes`` start vectors.
    """
    nodes, s = eig
    w = s[:probes].pow(2).sum(0)
    floor = 100 * torch.finfo(dtype).eps * theta.abs().max()
    return bool(w[nodes.abs() <= floor].sum() > 0.1 * w.sum())


def _rounding_visible(eig, probes: int) -> bool:
    """Raw statistic: whether rounding may move Σσ by over 1e-4 of it (then: float64).

    GᵀG is positive semi-definite, so a quadrature node θ < 0 is rounding, and as much weight
    again sits at rounding level above 0, where it adds at most √|θ| to each σ. The bound is
    2·(weight below 0)·√(max |θ| below 0) against the quadrature's own Σ w·√θ₊. A rank-deficient
    G (its zero eigenvalues come out as ±u·λ_max) trips it; small but real singular values, as
    a noise floor's hard edge at 0, give no negative node and keep the float32 products.
    ``eig``: ``eigh`` of the block Lanczos matrix of ``probes`` start vectors.
    """
    nodes, s = eig
    w = s[:probes].pow(2).sum(0)
    neg = nodes < 0
    if not bool(neg.any()):
        return False
    spurious = 2 * w[neg].sum() * nodes[neg].abs().max().sqrt()
    return bool(spurious > 1e-4 * (w * nodes.clamp_min(0).sqrt()).sum())


def _needs_float64(eig, p: FastErank, theta: torch.Tensor, signal: bool) -> bool:
    """Whether the products must be redone in float64 (``p.dtype`` is not float64 and rounding
    shows in the block Gauss quadrature of a Lanczos matrix of ``p.block`` start vectors, given
    by its ``eigh`` ``eig``): for the raw statistic ``_rounding_visible``; for the signal, whose
    negative eigenvalues are real, ``_rounding_bound``. The deflation's Lanczos matrix is such a
    quadrature of the whole spectrum, so the check runs there first, before the quadrature's
    products are spent; the check on the quadrature's own matrix stays as a backstop."""
    if p.dtype == torch.float64:
        return False
    if signal:
        return _rounding_bound(eig, p.block, theta, p.dtype)
    return _rounding_visible(eig, p.block)


def erank_estimate(
    grad: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    seed: int = 0,
    params: FastErank | None = None,
) -> float:
    """Effective rank (RaLoRA eq. 3; with ``noise`` the signal version, METHODS.md §2) of one
    large 2-D matrix by deflated stochastic Lanczos quadrature, from products with ``grad``
    (and ``noise``) only; NaN for a zero matrix or no signal. Deterministic given ``seed``.
    Where the smaller side is at most ``params.krylov_dim()`` it is computed exactly instead.
    ``params`` default: ``FAST_RAW``, or ``FAST_SIGNAL`` with a noise estimate.
    """
    if params is None:
        params = FAST_RAW if noise is None else FAST_SIGNAL
    g = grad.to(params.dtype)
    d = None if noise is None else noise.to(params.dtype)
    if g.shape[0] < g.shape[1]:  # work on the smaller side: A is k × k
        g, d = g.mT, (None if d is None else d.mT)
    k = g.shape[1]
    if k <= params.krylov_dim():
        sv = singular_values(g[None], None if d is None else d[None])
        return erank_from_singular_values(sv).item()

    op = _gram_op(g, d)
    gen = torch.Generator().manual_seed(int(seed))
    p = params
    # 1. deflation: converged Ritz pairs of a block Krylov space enter exactly
    t, basis, coupling = _block_lanczos(op, _orthonormal_block(k, p.block, gen, g.device), p.steps)
    theta, s = torch.linalg.eigh(t)
    if _needs_float64((theta, s), p, theta, d is not None):  # before the quadrature's products
        return erank_estimate(grad, noise, seed=seed, params=replace(p, dtype=torch.float64))
    locked = (coupling @ s[-p.block :]).norm(dim=0) <= p.lock_tol * theta.abs()
    y = basis @ s[:, locked]  # (k, L) converged eigenvectors
    f1, f2 = _f(theta[locked])
    total = _sq(g) - (0 if d is None else _sq(d))  # tr A
    trace = total - theta[locked].sum()  # tr Ã = tr A − Σθ_L
    # The control variate multiplies the error of tr Ã (rounding, ~1e-6·tr A, cancelling
    # against Σθ_L) by the slope of √λ, which is huge on a tiny tail: a rank-deficient G.
    if not trace.abs() > 1e-3 * total.abs():
        trace = None

    # 2. the rest: block Gauss quadrature on Ã = (I − YYᵀ) A (I − YYᵀ) in Y's complement
    def op_rest(v: torch.Tensor) -> torch.Tensor:
        out = op(v - y @ (y.mT @ v))
        return out - y @ (y.mT @ out)

    rest = k - y.shape[1]
    t2, _, _ = _block_lanczos(
        op_rest, _orthonormal_block(k, p.probes, gen, g.device, y), p.probe_steps
    )
    eig2 = torch.linalg.eigh(t2)
    if _needs_float64(eig2, replace(p, block=p.probes), theta, d is not None):  # backstop
        return erank_estimate(grad, noise, seed=seed, params=replace(p, dtype=torch.float64))
    r1, r2 = _rest_traces(t2, eig2, p, rest, trace)
    s1, s2 = f1.sum() + r1, f2.sum() + r2
    if not s1 > 0:
        return float("nan")
    erank = math.exp(float(s1.log() - s2 / s1))
    return min(max(erank, 1.0), float(k))  # estimation error must not leave [1, k]


def _rest_traces(t2, eig2, p: FastErank, rest: int, trace: torch.Tensor | None):
    """``(tr f₁, tr f₂)`` over the ``rest``-dimensional complement from its Lanczos matrix
    ``t2`` and that matrix's ``eigh`` ``eig2``."""
    r1, r2 = _quadrature(eig2, p.probes, rest, trace)
    if p.extrapolate:  # the leading half of T is the Lanczos matrix of half the steps
        half = (p.probe_steps // 2) * p.probes
        h1, h2 = _quadrature(torch.linalg.eigh(t2[:half, :half]), p.probes, rest, trace)
        r1, r2 = (4 * r1 - h1) / 3, (4 * r2 - h2) / 3
    return r1, r2


def _gram_op(g: torch.Tensor, d: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v ↦ (GᵀG − DᵀD) v`` in float64 out, from products with ``g`` and ``d`` only.

    Holds ``g`` (and ``d``) in both layouts, one copy each: the product with a transposed
    left factor and a thin right one is 2–3× slower than with a contiguous one on the CPU
    (MKL), and the copy costs about two such products (bench/erank.py)."""
    g, gt = _contiguous(g), _contiguous(g.mT)  # one of the two is g itself
    d, dt = (None, None) if d is None else (d.contiguous(), d.mT.contiguous())

    def op(v: torch.Tensor) -> torch.Tensor:
        # Gᵀ(G v), never the Gram: the rounding of each product is a small perturbation of G
        # itself, so singular values keep an absolute accuracy ~u·σ_max even in float32.
        v = v.to(g.dtype)
        out = gt @ (g @ v)
        return (out if dt is None else out - dt @ (d @ v)).to(torch.float64)

    return op


def _contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x.contiguous()``; a transposed 2-D view on the CPU is copied in slabs of 64 of its
    columns, each 64 contiguous rows of the source: 2× faster than the plain copy at
    1024 × 4096, which walks the source across its rows."""
    if x.is_contiguous() or x.device.type != "cpu" or not x.mT.is_contiguous():
        return x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype)
    for i in range(0, x.shape[1], 64):
        out[:, i : i + 64] = x[:, i : i + 64]
    return out


def _orthonormal_block(
    k: int, b: int, gen: torch.Generator, device: Any, deflate: torch.Tensor | None = None
) -> torch.Tensor:
    """``b`` random orthonormal float64 columns of length ``k`` (orthogonal to ``deflate``)."""
    z = torch.randn(k, b, generator=gen, dtype=torch.float64).to(device)
    if deflate is not None:
        for _ in range(2):
            z = z - deflate @ (deflate.mT @ z)
    return torch.linalg.qr(z)[0]

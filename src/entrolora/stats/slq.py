"""Fast effective rank of one large matrix (RaLoRA eq. 3; the signal version, METHODS.md §2) by
deflated stochastic Lanczos quadrature, from products with G (and D) only.

Used by ``spectral.effective_ranks`` for the raw statistic where the smaller side is at least
``spectral.FAST_MIN_SIDE``; bench/speed/erank.py times it against the exact Gram eigenvalues and
measures its error on synthetic and real gradients' spectra.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from .singular import erank_from_singular_values, singular_values


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
# The recurrences are float64; the products with G are float32 unless rounding shows in the
# quadrature (``_needs_float64``): A squares the condition number, and a float32 product lifts
# the ~k near-zero eigenvalues of a rank-deficient G to ~1e-7·λ_max, whose square roots add up
# to a visible share of Σσ. Deterministic given the seed.
@dataclass(frozen=True)
class FastErank:
    """Parameters of ``erank_estimate``: Lanczos ``block`` × ``steps`` for the deflation,
    ``probes`` × ``probe_steps`` for the rest (quadrature), ``lock_tol`` the relative residual
    of a locked Ritz pair, ``dtype`` of the products with G and D (the recurrences are float64),
    ``extrapolate``: Richardson-extrapolate the quadrature from probe_steps/2 and probe_steps."""

    block: int = 32
    steps: int = 12
    probes: int = 16
    probe_steps: int = 32
    lock_tol: float = 1e-3
    dtype: torch.dtype = torch.float32
    extrapolate: bool = True

    def krylov_dim(self) -> int:
        return self.block * self.steps + self.probes * self.probe_steps


# Tuned on bench/speed/erank.py's 4096 × 4096 gradients, synthetic and with the singular values of
# real probe gradients (896 product columns for the raw statistic). Real gradients' singular
# values fall steeply towards 0, where Gauss quadrature of √λ converges slowly (32 steps: 16
# gave errors to 3.5 %) and the undeflated rest keeps a heavy tail that makes the random
# estimate noisy: 12 deflation steps (~160 locked pairs on a steep profile against ~50 with 6) took
# the estimates within 1 % from 123 to 148 of 156 (39 profiles × 4 seeds), the worst from 3.0 %
# to 1.7 %, for ~25 % more time (``--compare``, docs/benchmarks.md).
# The signal's f(λ) = √λ₊ has a kink at 0 inside the spectrum of G Gᵀ − D Dᵀ, where the noise
# eigenvalues cluster; its quadrature needs a wider deflation and three times the steps, and
# is still only within a few per cent (bench/speed/erank.py) and no faster than the exact Gram
# eigenvalues on a CPU, so ``effective_ranks(method="auto")`` keeps the signal exact.
FAST_RAW = FastErank()
FAST_SIGNAL = FastErank(block=64, steps=7, probe_steps=48)


def _block_lanczos(
    op, start: torch.Tensor, steps: int, passes: int = 2, deflate: torch.Tensor | None = None
):
    """Block Lanczos with full reorthogonalisation: ``(T, basis (k, steps·b), last coupling)``.

    ``start`` (k, b) has orthonormal columns; ``T`` is the (steps·b)² block tridiagonal matrix.
    ``passes`` of Gram–Schmidt against the whole basis per step: two keep it orthonormal to
    rounding (Kahan–Parlett), as the deflation's Ritz vectors need; one is enough for T.
    ``deflate`` (k, L): orthonormal columns that ``start`` is orthogonal to; each step's output
    is projected off them in the same products as the basis, so the run is that of
    ``(I − YYᵀ) op (I − YYᵀ)``.
    """
    k, b = start.shape
    skip = 0 if deflate is None else deflate.shape[1]
    # Y and the basis as the rows of one buffer: one pair of products per pass projects a block
    # off both, the vectors done so far are one contiguous block, and with the block as rows
    # too both products reduce along contiguous memory (in float64 at 4096², 2.5–3× faster
    # than with columns, where one product has a transposed left factor)
    rows = start.new_empty(skip + steps * b, k)
    if deflate is not None:
        rows[:skip] = deflate.mT
    basis = rows[skip:].mT
    t = start.new_zeros(steps * b, steps * b)
    basis[:, :b] = start
    coupling, scale = None, 0.0
    for j in range(steps):
        lo, hi = j * b, (j + 1) * b
        q = basis[:, lo:hi]
        w = op(q).mT.contiguous()  # (b, k); op's output is column-major: no copy
        a = w @ q
        t[lo:hi, lo:hi] = (a + a.mT) / 2
        scale = max(scale, float(a.abs().max()))
        done = rows[: skip + hi]
        for _ in range(passes):
            w = w - (w @ done.mT) @ done
        q_next, coupling = torch.linalg.qr(w.mT)
        if coupling.diagonal().abs().min() <= 1e-10 * scale:
            # breakdown (the space is exhausted, e.g. a low-rank G): QR completes a nearly zero
            # w with arbitrary vectors, which must still be orthogonal to the basis and Y
            for _ in range(2):
                q_next = q_next - done.mT @ (done @ q_next)
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


def _gauss_weights(eig, probes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nodes, weights)`` of the block Gauss quadrature given by the ``eigh`` ``eig`` of the
    block Lanczos matrix of ``probes`` orthonormal start vectors: the weight of a node is the
    squared norm of its eigenvector's first ``probes`` entries (Σ weights = probes)."""
    nodes, s = eig
    return nodes, s[:probes].pow(2).sum(0)


def _quadrature(eig, probes: int, dim: int, trace: torch.Tensor | None):
    """``(tr f₁, tr f₂)`` over a ``dim``-dimensional space from the ``eigh`` ``eig`` of the
    block Lanczos matrix of ``probes`` orthonormal random start vectors (block Gauss
    quadrature); with ``trace`` (the exact tr of the operator there) λ is used as control
    variate."""
    theta, w = _gauss_weights(eig, probes)
    w = w * (dim / probes)  # Σw = dim
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
    nodes, w = _gauss_weights(eig, probes)
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
    nodes, w = _gauss_weights(eig, probes)
    neg = nodes < 0
    if not bool(neg.any()):
        return False
    spurious = 2 * w[neg].sum() * nodes[neg].abs().max().sqrt()
    return bool(spurious > 1e-4 * (w * nodes.clamp_min(0).sqrt()).sum())


def _needs_float64(eig, probes: int, dtype: torch.dtype, theta: torch.Tensor, signal: bool) -> bool:
    """Whether the products must be redone in float64 (``dtype`` is not float64 and rounding
    shows in the block Gauss quadrature of a Lanczos matrix of ``probes`` start vectors, given
    by its ``eigh`` ``eig``): for the raw statistic ``_rounding_visible``; for the signal, whose
    negative eigenvalues are real, ``_rounding_bound``. The signal is checked on the deflation's
    Lanczos matrix first (a quadrature of the whole spectrum, before the quadrature's products
    are spent), the raw statistic only on the quadrature's: a 12-step deflation reaches the
    bottom of a steep real spectrum, where float32 rounding makes negative Ritz values of no
    consequence (ratios up to 8e-2 on bench/speed/erank.py's steepest real profiles at 4096², the
    float32 estimates within 0.04 % of float64's). The quadrature in the complement had no
    negative node on those, nor on 9 of 10 at 2048² (the tenth, 4.5e-2, is redone: 0.5 % off
    in float32), and ~5 on rank-deficient matrices."""
    if dtype == torch.float64:
        return False
    if signal:
        return _rounding_bound(eig, probes, theta, dtype)
    return _rounding_visible(eig, probes)


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
    if d is not None and _needs_float64((theta, s), p.block, p.dtype, theta, True):
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
    t2 = _complement_lanczos(op, y, p, gen)
    eig2 = torch.linalg.eigh(t2)
    if _needs_float64(eig2, p.probes, p.dtype, theta, d is not None):
        return erank_estimate(grad, noise, seed=seed, params=replace(p, dtype=torch.float64))
    r1, r2 = _rest_traces(t2, eig2, p, k - y.shape[1], trace)
    s1, s2 = f1.sum() + r1, f2.sum() + r2
    if not s1 > 0:
        return float("nan")
    erank = math.exp(float(s1.log() - s2 / s1))
    return min(max(erank, 1.0), float(k))  # estimation error must not leave [1, k]


def _complement_lanczos(op, y: torch.Tensor, p: FastErank, gen: torch.Generator) -> torch.Tensor:
    """The block Lanczos matrix of ``Ã = (I − YYᵀ) A (I − YYᵀ)`` (``A`` given by ``op``) from
    ``p.probes`` random orthonormal start vectors in ``y``'s complement, ``p.probe_steps``
    steps."""
    start = _orthonormal_block(y.shape[0], p.probes, gen, y.device, y)
    # one reorthogonalisation pass: the quadrature reads T only, and on the spectra of
    # bench/speed/erank.py's real profiles its estimates equal those of two passes (to 0.01 %)
    return _block_lanczos(op, start, p.probe_steps, passes=1, deflate=y)[0]


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

    ``v`` (k, b) in, ``(k, b)`` column-major out (its rows are the block's vectors, as the
    Lanczos basis holds them). Holds ``g`` (and ``d``) in both layouts, one copy each: with a
    transposed view for Gᵀ the product ``vᵀGᵀ`` is 10–20 % slower at 14336 × 4096 (MKL,
    blocks of 16–32), more than the copy costs."""
    g, gt = _contiguous(g), _contiguous(g.mT)  # one of the two is g itself
    d, dt = (None, None) if d is None else (d.contiguous(), d.mT.contiguous())

    def op(v: torch.Tensor) -> torch.Tensor:
        # Gᵀ(G v), never the Gram: the rounding of each product is a small perturbation of G
        # itself, so singular values keep an absolute accuracy ~u·σ_max even in float32.
        # As rows, (vᵀGᵀ)G: the block comes in and goes out in the basis' layout
        v = v.mT.to(g.dtype, memory_format=torch.contiguous_format)
        out = (v @ gt) @ g
        return (out if dt is None else out - (v @ dt) @ d).to(torch.float64).mT

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

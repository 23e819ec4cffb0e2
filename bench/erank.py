"""Effective rank at 8B shapes: exact (float64 Gram eigenvalues) against the fast estimator.

    python bench/erank.py                 # 4096×4096, 1024×4096, 14336×4096; 1 thread
    python bench/erank.py --smoke         # one 1600×1300 matrix, 1 seed (CI)

Gradients with realistic spectra, built so that the exact answer is only known by computing
it: a decaying mean gradient ``μ = U diag(i^-α) Vᵀ`` over ``r = k/4`` random orthonormal
directions (α = 0.5, 1, 1.5), plus the sampling noise of a 64-step probe. Each of the 64 step
gradients is ``μ + ε_t`` with i.i.d. Gaussian ``ε_t`` of norm ``ν·‖μ‖`` (ν = 4: one step's noise
four times the mean, as in small-batch fine-tuning); the halves of 32 steps give
``G = μ + (e₁ + e₂)/2`` and the probe's noise estimate ``D = (e₁ − e₂)/2`` (METHODS.md §2), so
``‖G − μ‖ ≈ ν/√64·‖μ‖ = 0.5‖μ‖``: a noise floor under the decaying spectrum. Both statistics
are timed: the raw effective rank of G, and the signal one (G Gᵀ − D Dᵀ). Exact and fast run
alternately on the same matrix (the machine is shared: the ratio is the figure to read), in one
torch thread by default so that other processes cannot turn LAPACK's thread barriers into
waits; CPU seconds of this process are printed beside the wall clock.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from entrolora import spectral  # noqa: E402

SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096))
# Targets of one Llama-3-8B layer by shape (q, o; k, v; gate, up and down, whose 4096 × 14336
# has 14336 × 4096's singular values); 32 layers: the 224 matrices of the issue.
LAYER_COUNTS = {"4096x4096": 2, "1024x4096": 2, "14336x4096": 3}
LAYERS = 32
ALPHAS = (0.5, 1.0, 1.5)
STEPS, NU = 64, 4.0


def decaying_mean(
    m: int, n: int, alpha: float, gen: torch.Generator, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``μ = U diag(i^-α) Vᵀ`` ``(m, n)`` over ``min(m, n) // 4`` random orthonormal directions."""
    r = max(1, min(m, n) // 4)
    u = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=dtype))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=dtype))[0]
    return (u * torch.arange(1, r + 1, dtype=dtype).pow(-alpha)) @ v.mT


def gradient_pair(m: int, n: int, alpha: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, D)`` float32 ``(m, n)``: decaying mean gradient + 64-step probe noise (docstring)."""
    gen = torch.Generator().manual_seed(seed)
    mu = decaying_mean(m, n, alpha, gen)
    # each half is the mean of 32 steps: its noise has norm ν‖μ‖/√32
    scale = NU * mu.norm() / math.sqrt(STEPS / 2) / math.sqrt(m * n)
    e1 = torch.randn(m, n, generator=gen) * scale
    e2 = torch.randn(m, n, generator=gen) * scale
    g = mu.add_(e1.add(e2).mul_(0.5))
    d = e1.sub_(e2).mul_(0.5)
    return g, d


def timed(fn):
    """``(result, wall s, CPU s of this process)``."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def measure(g, d, seeds: int) -> dict:
    """Exact and fast effective rank of ``G`` (or the signal, with ``d``), interleaved."""
    noises = None if d is None else [d]
    exact, fast, errs = [], [], []
    value = None
    for seed in range(seeds):
        value, *t_exact = timed(lambda: spectral.effective_ranks([g], noises, method="exact")[0])
        est, *t_fast = timed(
            lambda s=seed: spectral.effective_ranks([g], noises, method="fast", seed=s)[0]
        )
        exact.append(t_exact)
        fast.append(t_fast)
        errs.append(est / value - 1)
    med = {
        key: statistics.median(x[i] for x in runs)
        for key, runs, i in (
            ("exact_wall", exact, 0),
            ("exact_cpu", exact, 1),
            ("fast_wall", fast, 0),
            ("fast_cpu", fast, 1),
        )
    }
    return {"exact": value, "max_err": max(errs, key=abs), "errs": errs, **med}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="one small matrix (CI)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--seeds", type=int, default=2, help="estimator seeds per matrix")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,1024x4096")
    ap.add_argument("--alphas", default=None, help="spectral decay exponents, e.g. 0.5,1")
    ap.add_argument("--statistics", default="raw,signal", help="raw, signal or both")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes, alphas = SHAPES, ALPHAS
    if args.smoke:  # smallest shape above both estimators' Krylov dimensions
        shapes, alphas = ((1600, 1300),), (1.0,)
    if args.shapes:
        shapes = tuple(tuple(int(x) for x in s.split("x")) for s in args.shapes.split(","))
    if args.alphas:
        alphas = tuple(float(a) for a in args.alphas.split(","))
    info = common.machine_info(torch.device("cpu"))
    print(f"# {common.describe(info)}")
    print(
        f"# load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; fast = "
        f"erank_estimate, raw {spectral.FAST_RAW}, signal {spectral.FAST_SIGNAL}; "
        f"effective_ranks uses it for the raw statistic from min side {spectral.FAST_MIN_SIDE}"
    )
    print(
        f"# medians over {args.seeds} interleaved exact/fast pair(s); err = fast/exact − 1, "
        "the largest over the seeds"
    )
    head = (
        f"{'shape':>11} {'α':>4} {'statistic':>9} {'exact erank':>11} {'err':>8} "
        f"{'exact s':>8} {'fast s':>7} {'×':>6} {'exact cpu':>9} {'fast cpu':>8} {'×cpu':>6}"
    )
    print(head)
    rows = []
    for m, n in shapes:
        for alpha in alphas:
            g, d = gradient_pair(m, n, alpha)
            for stat, noise in (("raw", None), ("signal", d)):
                if stat not in args.statistics.split(","):
                    continue
                r = measure(g, noise, args.seeds)
                r.update(shape=f"{m}x{n}", alpha=alpha, statistic=stat)
                rows.append(r)
                print(
                    f"{r['shape']:>11} {alpha:4.1f} {stat:>9} {r['exact']:11.1f} "
                    f"{100 * r['max_err']:+7.2f}% {r['exact_wall']:8.2f} {r['fast_wall']:7.2f} "
                    f"{r['exact_wall'] / r['fast_wall']:6.1f} {r['exact_cpu']:9.2f} "
                    f"{r['fast_cpu']:8.2f} {r['exact_cpu'] / r['fast_cpu']:6.1f}",
                    flush=True,
                )
            del g, d
    for line in whole_model(rows):
        print(line)
    print(f"# load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return rows


def whole_model(rows: list[dict]) -> list[str]:
    """The raw statistic of all 224 targets of an 8B model, per α where every shape was timed:
    CPU seconds exact against ``method="auto"`` (the estimator from ``FAST_MIN_SIDE``)."""
    lines = []
    for alpha in sorted({r["alpha"] for r in rows}):
        got = {r["shape"]: r for r in rows if r["alpha"] == alpha and r["statistic"] == "raw"}
        if not set(LAYER_COUNTS) <= set(got):
            continue
        exact = auto = 0.0
        for shape, count in LAYER_COUNTS.items():
            r = got[shape]
            fast = min(int(x) for x in shape.split("x")) >= spectral.FAST_MIN_SIDE
            exact += LAYERS * count * r["exact_cpu"]
            auto += LAYERS * count * (r["fast_cpu"] if fast else r["exact_cpu"])
        lines.append(
            f"# 8B model, all {LAYERS * sum(LAYER_COUNTS.values())} targets, α {alpha}, raw: "
            f"exact {exact:.0f} CPU s, auto {auto:.0f} CPU s, {exact / auto:.1f}×"
        )
    return lines


if __name__ == "__main__":
    main(sys.argv[1:])

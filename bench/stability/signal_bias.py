"""How far the signal effective rank (METHODS.md §2) sits from the true one (issue 14).

    python bench/stability/signal_bias.py      # 384×384 and 576×576, α 0.5 and 1, SNR 1…64, 3 seeds
    python bench/stability/signal_bias.py --smoke   # one small shape (CI)

Synthetic gradients whose right answer is known: a decaying mean gradient ``μ`` (bench/common.py's
``decaying_mean``) and two independent half-probe noises ``e₁, e₂`` of i.i.d. Gaussian entries,
sized so that the probe's ``snr = ‖μ‖²/‖e‖²`` takes the given value, where ``G = μ + e`` with
``e = (e₁ + e₂)/2`` and ``D = (e₁ − e₂)/2`` (the probe's halves). Printed, in float64: the true
effective rank of ``μ``; the raw one of ``G``; the signal one as METHODS.md §2 defines it
(``entrolora.stats.spectral.effective_ranks`` with the noise: eigenvalues of ``G Gᵀ − D Dᵀ`` clipped
at 0); and, for comparison, the same eigenvalues with everything at or below the noise edge set to
0, the edge read off the most negative eigenvalue (``G Gᵀ − D Dᵀ − μμᵀ`` is sign-symmetric in
distribution for any sign-symmetric noise, so its positive edge mirrors its negative one). The
third is not what the library computes; it shows what the clipping costs on i.i.d. noise. On
real probes, whose noise is not i.i.d., it removes nearly all of the signal
(bench/stability/stability.py's ``edge`` reading: one RaLoRA block for every module;
docs/benchmarks.md §3).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import (  # noqa: E402
    decaying_mean,  # noqa: E402
    describe,
    machine_info,
)
from entrolora.stats import spectral  # noqa: E402

SHAPES = ((384, 384), (576, 576))  # MiniLM's attention matrices; SmolLM2-135M's q and o
SNRS = (1.0, 4.0, 16.0, 64.0)  # medians at S = 64: MiniLM 10.7, SmolLM2 232 (65 at S = 16)
ALPHAS = (0.5, 1.0)


def signal_and_noise(
    m: int, n: int, alpha: float, snr: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(μ, G, D)`` float64 ``(m, n)`` with ``‖μ‖² / ‖(e₁ + e₂)/2‖² = snr`` in expectation."""
    gen = torch.Generator().manual_seed(seed)
    mu = decaying_mean(m, n, alpha, gen, torch.float64)
    # each half's entries: ‖(e₁+e₂)/2‖² = ‖e_h‖²/2, so ‖e_h‖² = 2‖μ‖²/snr
    scale = float(mu.norm()) * math.sqrt(2.0 / snr / (m * n))
    e1 = torch.randn(m, n, generator=gen, dtype=torch.float64) * scale
    e2 = torch.randn(m, n, generator=gen, dtype=torch.float64) * scale
    return mu, mu + (e1 + e2) / 2, (e1 - e2) / 2


def signal_eigenvalues(g: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending) of ``G Gᵀ − D Dᵀ`` on the smaller side."""
    m = g @ g.mT - d @ d.mT if g.shape[0] <= g.shape[1] else g.mT @ g - d.mT @ d
    return torch.linalg.eigvalsh(m)


def above_edge(ev: torch.Tensor) -> torch.Tensor:
    """Mask of the eigenvalues above the mirrored noise edge ``|λ_min|`` (what the rule keeps)."""
    return ev > -ev.min()


def edge_erank(g: torch.Tensor, d: torch.Tensor) -> float:
    """Effective rank from the eigenvalues of ``G Gᵀ − D Dᵀ`` above the mirrored noise edge."""
    ev = signal_eigenvalues(g, d)
    kept = torch.where(above_edge(ev), ev, torch.zeros_like(ev))
    return float(spectral.erank_from_singular_values(kept.sqrt()))


def measure(m: int, n: int, alpha: float, snr: float, seeds: int) -> dict:
    """Mean over ``seeds`` of the true, raw, signal and edge effective ranks of one setting."""
    values: dict[str, list[float]] = {"true": [], "raw": [], "signal": [], "edge": []}
    for seed in range(seeds):
        mu, g, d = signal_and_noise(m, n, alpha, snr, seed)
        values["true"].append(float(spectral.effective_ranks([mu], method="exact")[0]))
        values["raw"].append(float(spectral.effective_ranks([g], method="exact")[0]))
        exact = spectral.effective_ranks([g], noises=[d], method="exact")[0]
        values["signal"].append(float(exact))
        values["edge"].append(edge_erank(g, d))
    return {k: statistics.fmean(v) for k, v in values.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="one 96×160 shape (CI)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    shapes = ((96, 160),) if args.smoke else SHAPES
    print(f"# python bench/stability/signal_bias.py {' '.join(argv or sys.argv[1:])}")
    print(f"# {describe(machine_info(torch.device('cpu')))}")
    print("# mean effective rank over the seeds; in brackets the error relative to the true one")
    print(f"{'shape':>9} {'α':>4} {'SNR':>5} {'true':>6} {'raw':>15} {'signal §2':>15} "
          f"{'edge':>15}")  # fmt: skip
    rows = []
    for m, n in shapes:
        for alpha in ALPHAS:
            for snr in SNRS:
                r = {"shape": f"{m}x{n}", "alpha": alpha, "snr": snr,
                     **measure(m, n, alpha, snr, args.seeds)}  # fmt: skip
                rows.append(r)
                cells = " ".join(
                    f"{r[k]:6.1f} ({100 * (r[k] / r['true'] - 1):+5.0f}%)"
                    for k in ("raw", "signal", "edge")
                )
                print(f"{r['shape']:>9} {alpha:4.1f} {snr:5.0f} {r['true']:6.1f} {cells}")
    return rows


if __name__ == "__main__":
    main()

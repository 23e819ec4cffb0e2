"""How the probe's noise estimate is shaped on a real model (issue 14): why the mirrored-noise-edge
rule of bench/stability/signal_bias.py fails on real probes.

    python bench/stability/noise_shape.py  # MiniLM, subset 0 of stability.py, S = 64

Probes the first subset exactly as ``bench/stability/stability.py`` does (batch 32, length 64,
blocks of 8, seed 0) and prints per module, in float64: the SNR; the share of ``‖D‖²_F`` in the top
10 eigenvalues of ``D Dᵀ`` (i.i.d. noise of this shape puts about 10/k there, k the smaller side);
the same share for ``G``; and how many eigenvalues of ``G Gᵀ − D Dᵀ`` lie above the mirrored
noise edge ``|λ_min|`` (what the edge rule keeps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import types
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from signal_bias import above_edge, signal_eigenvalues  # noqa: E402

import stability  # noqa: E402
from common import describe, machine_info  # noqa: E402


def top_share(m: torch.Tensor, top: int = 10) -> float:
    """Share of ``tr(m mᵀ)`` in the ``top`` largest eigenvalues of ``m mᵀ`` (smaller side)."""
    ev = torch.linalg.svdvals(m) ** 2
    return float(ev[:top].sum() / ev.sum())


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load, batches = stability.real_setup(None, 32, 64)
    probe = stability.Probe("minilm", args.steps, 0, 0, 0, 32, 64, 8)
    blocks = stability.block_means(probe, load, batches, None, types.SimpleNamespace())
    stats = stability.stats_of(blocks)
    print(f"# python bench/stability/noise_shape.py {' '.join(argv or sys.argv[1:])}")
    print(f"# {describe(machine_info(torch.device('cpu')))}")
    print(f"{'module':<46} {'SNR':>6} {'D top-10':>8} {'G top-10':>8} {'above edge':>10}")
    rows = []
    for name, m in stats.modules.items():
        g, d = stats.gradients[name].double(), stats.noise[name].double()
        ev = signal_eigenvalues(g, d)
        r = {"module": name, "snr": m.snr, "d_top": top_share(d), "g_top": top_share(g),
             "kept": int(above_edge(ev).sum()), "k": len(ev)}  # fmt: skip
        rows.append(r)
        print(f"{name:<46} {r['snr']:6.1f} {r['d_top']:8.2f} {r['g_top']:8.2f} "
              f"{r['kept']:>5}/{r['k']}")  # fmt: skip
    med = {k: statistics.median(r[k] for r in rows) for k in ("snr", "d_top", "g_top", "kept")}
    print(
        f"# median: SNR {med['snr']:.1f}, D top-10 {med['d_top']:.2f} (i.i.d. ≈ "
        f"{10 / rows[0]['k']:.2f}), G top-10 {med['g_top']:.2f}, above edge {med['kept']:.0f}"
    )
    return rows


if __name__ == "__main__":
    main()

"""Why E²LoRA's ranks move with the calibration draw, and why no gate on the rounding fixes it.

HRA (METHODS.md §3) rounds real shares ``x_k = F_k·R`` to integer ranks by largest remainder.
``share_cov`` gives the one-probe covariance of the shares by the delta method over the type's
moments (as ``stats.margin_noise.margin_sd`` does for the partition's margins); stability.py
stores its sd beside every plan. The simulation below draws true shares at random positions,
adds share noise of a given sd and counts how often four draws give identical ranks: with the
library's largest remainder, and with a gate on the rounding in the spirit of the partition's (a
leftover unit whose leader's remainder is within ``z`` sd of another's goes to the lower rank
among them). Any deterministic rounding has a boundary per unit; the gate moves the boundaries
but does not thin them, so it helps only where true shares sit on a tie. docs/benchmarks.md §3,
"Ranks: rounding noise, not a decision".

    python bench/stability/rank_noise.py            # the table (≈ 30 s on one core)
    python bench/stability/rank_noise.py --smoke    # CI
    python bench/stability/rank_noise.py --records bench/results/stability/minilm-ranks.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from entrolora.planners.e2lora import largest_remainder
from entrolora.stats.margin_noise import type_moments
from entrolora.stats.moments import HALF_LOG_2PI_PLUS_HALF


def share_cov(
    stats: Any,
    module_type: str,
    intervals: Sequence[Sequence[int]],
    total: int,
    statistics: str = "signal",
) -> list[list[float]] | None:
    """``(K × K)`` covariance of HRA's real shares ``x_k = F_k·R'`` (eq. 6, shifted weights;
    ``R'`` is ``total`` less one unit per degenerate interval) by the delta method over the type's
    moments: ``H_k`` is the entropy of the interval's top member (that member held fixed).
    Rows and columns of degenerate intervals are 0; None without the moment covariance."""
    tm = type_moments(stats, module_type, statistics)
    if tm is None:
        return None
    h0 = torch.log(tm.sigma(tm.theta)).tolist()
    tops = []
    for s, e in intervals:
        members = [i for i in range(s, e + 1) if bool(tm.live[i])]
        tops.append(max(members, key=lambda i: h0[i]) if members else None)
    idx = [t for t in tops if t is not None]
    out = [[0.0] * len(tops) for _ in tops]
    if not idx:
        return out
    budget = total - (len(tops) - len(idx))

    def shares(theta: torch.Tensor) -> torch.Tensor:
        h = torch.log(tm.sigma(theta))[idx] + HALF_LOG_2PI_PLUS_HALF
        w = 1.0 + h - h.min()
        return budget * w / w.sum()

    jac = tm.jacobian(shares)  # (K live, 2N)
    cov = (jac @ tm.cov @ jac.T).tolist()
    pos = [k for k, t in enumerate(tops) if t is not None]
    for a, i in enumerate(pos):
        for b, j in enumerate(pos):
            out[i][j] = cov[a][b]
    return out


def gated_rounding(x: Sequence[float], sd: float, z: float) -> list[int]:
    """Largest remainder on shares ``x`` (Σ integer, each ≥ 1), except that a leftover unit
    whose leading remainder is within ``z·sd·√2`` (independent shares of sd ``sd``) of another
    remaining one goes to the lowest rank among them (ties: lower index)."""
    ranks = [math.floor(v + 1e-9) for v in x]
    rest = [v - r for v, r in zip(x, ranks)]
    order = sorted(range(len(x)), key=lambda k: (-rest[k], k))
    for _ in range(round(sum(x)) - sum(ranks)):
        lead = order[0]
        tied = [k for k in order if rest[lead] - rest[k] < z * sd * math.sqrt(2) or k == lead]
        pick = min(tied, key=lambda k: (ranks[k], k))
        ranks[pick] += 1
        order.remove(pick)
    return ranks


def simulate(
    k: int, sd: float, z: float | None, trials: int, rng: np.random.Generator, r: int = 8
) -> tuple[float, float]:
    """``(identical, within one)``: the share of ``trials`` random true positions whose four
    noisy draws give identical ranks, and ranks within one unit of each other."""
    total = k * r
    same = near = 0
    for _ in range(trials):
        true = rng.dirichlet(np.full(k, 20.0)) * total
        outs = []
        for _ in range(4):
            x = true + rng.normal(0.0, sd, k)
            x = x / x.sum() * total
            if z is None:
                outs.append(largest_remainder(list(x / total), total))
            else:
                outs.append(gated_rounding(list(x), sd, z))
        arr = np.array(outs)
        same += bool((arr == arr[0]).all())
        near += bool((arr.max(0) - arr.min(0) <= 1).all())
    return same / trials, near / trials


def records_table(path: str) -> str:
    """Per type of a stability.py ``--whole`` JSONL (signal reading, every subset the same
    intervals): each share's mean over the subsets, its sd across them, and the subsets' mean
    one-probe sd; the ratio of the two sd's (median over the shares) closes the table."""
    recs = [json.loads(line)["signal"] for line in Path(path).read_text().splitlines()]
    head = f"{'type':<44} {'ranks (each subset)':<40} share: mean, sd across, one-probe sd"
    lines = [f"# python bench/stability/rank_noise.py --records {path}", head]
    ratios = []
    for t in recs[0]["shares"]:
        if len({json.dumps(r["intervals"][t]) for r in recs}) > 1 or "share_sd" not in recs[0]:
            lines.append(f"{t:<44} intervals differ across subsets")
            continue
        x = np.array([r["shares"][t] for r in recs], dtype=float)
        one = np.array([r["share_sd"][t] for r in recs], dtype=float).mean(0)
        across = x.std(0, ddof=1)
        ratios += list(one / across)
        ranks = " ".join(str(r["ranks"][t]) for r in recs)
        cells = ", ".join(f"{m:.2f} {a:.3f} {o:.3f}" for m, a, o in zip(x.mean(0), across, one))
        lines.append(f"{t:<44} {ranks:<40} {cells}")
    if ratios:
        span = f"{statistics.median(ratios):.2f} (range {min(ratios):.2f}–{max(ratios):.2f})"
        lines.append(f"one-probe sd / sd across subsets over {len(ratios)} shares: median {span}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=2000, help="true positions per cell")
    ap.add_argument("--smoke", action="store_true", help="a few trials (CI)")
    ap.add_argument("--records", default=None, help="a stability.py --whole JSONL: its shares")
    args = ap.parse_args(argv)
    if args.records:
        out = records_table(args.records)
        print(out)
        return out
    trials = 5 if args.smoke else args.trials
    rng = np.random.default_rng(0)
    lines = [
        f"# python bench/stability/rank_noise.py --trials {trials}",
        "# four draws of K shares (r = 8, R = K·r, true shares Dirichlet(20)·R), Gaussian noise",
        "# of sd per share; % of true positions whose four draws give identical ranks (within",
        "# one unit in brackets): METHODS.md's largest remainder, and with a gate at z",
        "",
        f"{'K':>2} {'share sd':>8} {'largest remainder':>18} {'gate z=2':>12} {'gate z=6':>12}",
    ]
    for k in (2, 3, 5):
        for sd in (0.05, 0.1, 0.2):
            cells = [simulate(k, sd, z, trials, rng) for z in (None, 2.0, 6.0)]
            text = [f"{100 * a:3.0f} % ({100 * b:3.0f} %)" for a, b in cells]
            lines.append(f"{k:>2} {sd:>8} {text[0]:>18} {text[1]:>12} {text[2]:>12}")
    out = "\n".join(lines)
    print(out)
    return out


if __name__ == "__main__":
    main()

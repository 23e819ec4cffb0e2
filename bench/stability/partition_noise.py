"""How large a probe do E²LoRA's intervals need to be the same across calibration draws? (issue 14)

    python bench/stability/partition_noise.py bench/results/stability/minilm-sim.jsonl
    python bench/stability/partition_noise.py bench/results/stability/smollm2-sim.jsonl

Reads the similarity matrices that ``bench/stability/stability.py`` records for each of K disjoint
subsets (one probe of S batches each) and asks why their greedy partitions (METHODS.md §3, Algorithm
2) differ. Every decision of the greedy chain is a comparison ``sim[c][s] ≥ τ_s`` (candidate layer c
against the interval's start s, ``τ_s`` the mean of row s without its diagonal), i.e. the sign
of a margin ``m = sim[c][s] − τ_s`` that is linear in the matrix. On the subsets' mean matrix
the chain's margins are ``m̄_d`` (the mean of the K subsets' margins of the same decision), and
the K subsets give each decision's sampling standard deviation ``σ_d(S)``. If every subset takes
decision d on the side of ``m̄_d`` with probability ``Φ(|m̄_d| / σ_d)``, independently, the K
subsets all follow the mean chain with probability ``P_t(S) = Π_d Φ(|m̄_d| / σ_d(S))^K``; the
sampling noise of a mean gradient falls as ``1/√S``, so at a probe of ``S'`` batches
``σ_d(S') = σ_d(S)·√(S/S')``. The script prints, per module type, the smallest ``|m̄_d|/σ_d``,
``P_t`` at the measured S against the observed identity, and the ``S'`` (doubling S) at which
``P_t`` reaches 0.9; per reading, the probability that at least 90 % of the types come out
identical at each S' (types independent), the probe size for 90 % (the first S' at which that
is more likely than not), and the share the alternative partition (``partition="dp"``, Appendix
G) reaches on the same matrices at the granularity of the greedy one: its penalty λ is set per
type so that dp splits the mean matrix into as many intervals as the greedy chain does.
(METHODS.md's default λ = 0.5 cannot be used: with ``C = −mean`` of a block whose entries are
≤ 1, merging L layers beats L singletons only if the block's mean exceeds ``L − λ(L − 1)``,
i.e. never for λ < 1; dp at λ = 0.5 makes every layer its own interval.)

Caveats printed with the table: ``|m̄_d|`` is itself an estimate (its noise ``σ_d/√K`` makes a
near-zero margin look larger), ``σ_d`` comes from K − 1 degrees of freedom, and the raw reading's
matrix drifts with S (its second moments hold the noise), which the extrapolation ignores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
from entrolora.planners.e2lora import (  # noqa: E402
    adaptive_threshold,
    dp_intervals,
    greedy_intervals,
)

READINGS = ("raw", "signal")
TARGET = 0.9


@dataclass(frozen=True)
class Decision:
    """One comparison of the greedy chain: candidate ``c`` against start ``s``, K margins."""

    s: int
    c: int
    margins: np.ndarray  # (K,) sim_k[c][s] − τ_s,k
    probe_sd: np.ndarray | None = None  # (K,) each subset's one-probe sd of the margin (issue 33)

    @property
    def mean(self) -> float:
        return float(self.margins.mean())

    @property
    def sd(self) -> float:
        return float(self.margins.std(ddof=1))


def margin(sim: np.ndarray, s: int, c: int) -> float:
    """``sim[c][s] − τ_s`` with the adaptive threshold of Algorithm 2."""
    return float(sim[c, s]) - adaptive_threshold(sim[s].tolist(), s)


def mean_chain(
    sims: np.ndarray, degenerate: Sequence[bool], sds: np.ndarray | None = None
) -> tuple[list, list[Decision]]:
    """Algorithm 2 on the mean of the K matrices ``sims`` (K, N, N): its intervals and decisions.

    The chain is ``greedy_intervals``' (checked); the decisions carry each subset's margin and,
    given ``sds`` (K, N, N: each subset's one-probe sd of margin [s][c]), its one-probe sd.
    """
    mean = sims.mean(axis=0)
    n = mean.shape[0]
    intervals, decisions, p = [], [], 0
    while p < n:
        s, e = p, p
        if not degenerate[s]:
            while e + 1 < n and not degenerate[e + 1]:
                one = None if sds is None else sds[:, s, e + 1]
                d = Decision(s, e + 1, np.array([margin(m, s, e + 1) for m in sims]), one)
                decisions.append(d)
                if margin(mean, s, e + 1) < 0:
                    break
                e += 1
        intervals.append((s, e))
        p = e + 1
    assert intervals == greedy_intervals(mean.tolist(), degenerate)[0]
    return intervals, decisions


def follow_probability(decisions: Sequence[Decision], k: int, scale: float = 1.0) -> float:
    """``Π_d Φ(|m̄_d| / (σ_d·scale))^K``: all K subsets take every decision as the mean chain does.

    ``scale`` = √(S/S') moves the noise to a probe of S' batches.
    """
    p = 1.0
    for d in decisions:
        sd = d.sd * scale
        z = math.inf if sd == 0 else abs(d.mean) / sd
        p *= (0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))) ** k
    return p


def groups(path: Path) -> dict[tuple, list[dict]]:
    """Records with similarity matrices, keyed (model, probe head, seeds mode, head-fit, S).

    ``paired``: subset k probed with seed k; ``fixed``: every subset with seed 0 (subset 0's
    record belongs to both, as in bench/stability/stability.py).
    """
    pooled: dict[tuple, list[dict]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "similarity" in r["signal"]:
            p = r["probe"]
            key = (p["model"], p.get("probe_head", "model"), p["head_fit"], r["size"])
            pooled.setdefault(key, []).append(r)
    out: dict[tuple, list[dict]] = {}
    for (model, head, head_fit, size), recs in sorted(pooled.items()):
        for seeds, keep in (("paired", lambda p: p["seed"] == p["subset"]),
                            ("fixed", lambda p: p["seed"] == 0)):  # fmt: skip
            chosen = sorted(
                (r for r in recs if keep(r["probe"])), key=lambda r: r["probe"]["subset"]
            )
            if len(chosen) > 1:
                out[(model, head, seeds, head_fit, size)] = chosen
    return out


@dataclass(frozen=True)
class TypeResult:
    """One module type at one S and reading."""

    name: str
    layers: int
    intervals: int  # of the mean chain
    observed: bool  # greedy intervals identical in all K subsets
    dp_observed: bool  # dp intervals identical in all K subsets
    dp_lam: float  # the matched penalty
    decisions: list[Decision]
    entry_sd: float  # median over off-diagonal entries of the subsets' sd

    def probability(self, k: int, scale: float = 1.0) -> float:
        return follow_probability(self.decisions, k, scale)

    @property
    def sd_ratios(self) -> list[float]:
        """Per decision: the subsets' mean one-probe sd over their spread σ_d (issue 33)."""
        return [float(d.probe_sd.mean() / d.sd) for d in self.decisions
                if d.probe_sd is not None and d.sd > 0]  # fmt: skip

    @property
    def min_z(self) -> float:
        return min(
            (abs(d.mean) / d.sd if d.sd else math.inf for d in self.decisions), default=math.inf
        )


def matched_lam(sim: np.ndarray, degenerate: Sequence[bool], intervals: int) -> float:
    """The smallest λ (bisection) at which ``dp_intervals`` gives at most ``intervals`` intervals.

    The count falls as λ grows; above ``λ = N + 3`` one interval beats any split (entries ≥ −1).
    """
    lo, hi = 0.0, float(len(sim) + 3)
    for _ in range(50):
        mid = (lo + hi) / 2
        if len(dp_intervals(sim.tolist(), degenerate, mid)) <= intervals:
            hi = mid
        else:
            lo = mid
    return hi


def analyse(records: Sequence[dict], reading: str) -> list[TypeResult]:
    """Per module type: the mean chain, its decisions and what the K subsets did."""
    out = []
    for t in records[0][reading]["similarity"]:
        sims = np.array([r[reading]["similarity"][t] for r in records], dtype=np.float64)
        degenerate = [any(flags) for flags in zip(*(r[reading]["degenerate"][t] for r in records))]
        sds = None
        if all("margin_sd" in r[reading] and t in r[reading]["margin_sd"] for r in records):
            sds = np.array([r[reading]["margin_sd"][t] for r in records], dtype=np.float64)
        intervals, decisions = mean_chain(sims, degenerate, sds)
        greedy = {json.dumps(greedy_intervals(m.tolist(), degenerate)[0]) for m in sims}
        lam = matched_lam(sims.mean(axis=0), degenerate, len(intervals))
        dp = {json.dumps(dp_intervals(m.tolist(), degenerate, lam)) for m in sims}
        off = ~np.eye(sims.shape[1], dtype=bool)
        entry_sd = float(np.median(sims.std(axis=0, ddof=1)[off])) if off.any() else 0.0
        out.append(TypeResult(t, sims.shape[1], len(intervals), len(greedy) == 1, len(dp) == 1, lam,
                              decisions, entry_sd))  # fmt: skip
    return out


def doubling(size: int, ok: Callable[[int], bool], limit: int = 1 << 20) -> int | None:
    """The first ``S' = size·2^j ≤ limit`` with ``ok(S')``, else None."""
    s = size
    while s <= limit:
        if ok(s):
            return s
        s *= 2
    return None


def needed(result: TypeResult, k: int, size: int) -> int | None:
    """Smallest S' = size·2^j at which all K subsets follow the mean chain w.p. ≥ 0.9."""
    return doubling(size, lambda s: result.probability(k, math.sqrt(size / s)) >= TARGET)


def share_reached(results: Sequence[TypeResult], k: int, size: int, s: int) -> float:
    """P(at least 90 % of the types identical in all ``k`` subsets) at a probe of ``s`` batches:
    the types are independent with probabilities P_t (a Poisson-binomial count)."""
    dist = [1.0]  # dist[j]: P(j of the types so far identical)
    for r in results:
        p = r.probability(k, math.sqrt(size / s))
        dist = [a * (1 - p) + b * p for a, b in zip([*dist, 0.0], [0.0, *dist])]
    need = math.ceil(TARGET * len(results) - 1e-9)
    return sum(dist[need:])


def shares(results: Sequence[TypeResult], k: int, size: int, horizon: Sequence[int]) -> str:
    """``S'=…: P`` of reaching 90 % of types for each S' ≥ ``size`` of ``horizon``, and the probe
    size for 90 %: the first S' = size·2^j at which reaching it is more likely than not."""
    cells = [f"S'={s}: {share_reached(results, k, size, s):.2f}" for s in horizon if s >= size]
    first = doubling(size, lambda s: share_reached(results, k, size, s) >= 0.5)
    return ", ".join(cells) + f"; probe size for 90 %: {first or '-'}"


def short(name: str) -> str:
    return name.replace("*.", "").split(".")[-1]


def report(path: Path, horizon: Sequence[int], also_k: Sequence[int] = (), cmd: str = "") -> str:
    lines = [f"# python bench/stability/partition_noise.py {cmd or path}",
             "# dp same: Appendix G's partition, λ per type such that the mean matrix gets the "
             "greedy chain's number of intervals",
             "# P = Π_d Φ(|m̄_d|/σ_d)^K, all K subsets follow the mean matrix's greedy chain; "
             "σ_d from the K subsets (K − 1 dof), scaled by √(S/S') to a probe of S' batches",
             "# caveats: |m̄_d| is an estimate (noise σ_d/√K) and the raw matrix drifts with S; "
             "'needed': the first S·2^j with P ≥ 0.9 (none up to 2^20: '-')"]  # fmt: skip
    for key, records in groups(path).items():
        model, head, seeds, head_fit, size = key
        k = len(records)
        lines.append("")
        lines.append(
            f"## {model}, {head} head, {seeds} seeds, head-fit {head_fit}, S = {size}, K = {k}"
        )
        lines.append(f"{'reading':<7} {'type':<12} {'layers':>6} {'intervals':>9} {'decisions':>9} "
                     f"{'entry sd':>9} {'min z':>7} {'P(S)':>6} {'same':>5} {'dp same':>7} "
                     f"{'dp λ':>6} {'needed S':>9}")  # fmt: skip
        for reading in READINGS:
            results = analyse(records, reading)
            for r in results:
                need = needed(r, k, size)
                lines.append(
                    f"{reading:<7} {short(r.name):<12} {r.layers:>6} {r.intervals:>9} "
                    f"{len(r.decisions):>9} {r.entry_sd:>9.2e} {r.min_z:>7.2f} "
                    f"{r.probability(k):>6.2f} {'yes' if r.observed else 'no':>5} "
                    f"{'yes' if r.dp_observed else 'no':>7} {r.dp_lam:>6.3f} "
                    f"{need if need else '-':>9}"
                )
            ratios = [v for r in results for v in r.sd_ratios]
            if ratios:
                q = np.quantile(ratios, [0.1, 0.5, 0.9])
                per_type = ", ".join(f"{short(r.name)} {np.median(r.sd_ratios):.2f}"
                                     for r in results if r.sd_ratios)  # fmt: skip
                geo = math.exp(float(np.mean(np.log(ratios))))
                lines.append(f"{reading:<7} one-probe sd / subsets' sd over {len(ratios)} "
                             f"decisions: median {q[1]:.2f} (10–90 %: {q[0]:.2f}–{q[2]:.2f}), "
                             f"geometric mean {geo:.2f}; per type (median): "
                             f"{per_type}")  # fmt: skip
            seen = sum(r.observed for r in results)
            dp_seen = sum(r.dp_observed for r in results)
            lines.append(f"{reading:<7} P(≥ 90 % of types identical): "
                         f"{shares(results, k, size, horizon)}; observed greedy "
                         f"{seen}/{len(results)}, dp {dp_seen}/{len(results)}")  # fmt: skip
            for other in (v for v in also_k if v != k):
                lines.append(f"{reading:<7} P(≥ 90 % identical in {other} subsets): "
                             f"{shares(results, other, size, horizon)}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "jsonl", type=Path, help="a bench/stability/stability.py JSONL with similarity matrices"
    )
    p.add_argument(
        "--horizon", default="64,128,256,512,1024,2048,4096", help="probe sizes S' to predict for"
    )
    p.add_argument("--also-k", default="", help="other subset counts to predict for, e.g. 2")
    p.add_argument("--out", type=Path, default=None, help="text file (default <jsonl>-noise.txt)")
    args = p.parse_args(argv)
    also_k = [int(v) for v in args.also_k.split(",") if v]
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    text = report(args.jsonl, [int(v) for v in args.horizon.split(",")], also_k, cmd)
    out = args.out or args.jsonl.with_name(args.jsonl.stem + "-noise.txt")
    out.write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()

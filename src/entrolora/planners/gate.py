"""E²LoRA's significance gate (issue 33, docs/methods.md "The gate"): Algorithm 2's chain of
decisions ``sim[c][s] ≥ τ_s``, where a decision whose margin lies within ``z`` one-probe standard
deviations of 0 is not made by the draw: it takes the fixed side, merge, and the plan says so.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..stats.margin_noise import decide_steps

if TYPE_CHECKING:
    from ..stats import GradientStats

# Similarities within this (relative) distance of a threshold count as equal to it, so float
# noise in the similarity matrix cannot split layers whose gradients have identical moments.
TIE_TOL = 1e-9


# -- LSS: the chain ------------------------------------------------------------------------------
def adaptive_threshold(row: Sequence[float], s: int) -> float:
    """Algorithm 2's ``τ_s = mean_{k≠s} sim[s][k]`` from row ``s`` of the similarity matrix."""
    return (math.fsum(row) - row[s]) / (len(row) - 1)


@dataclass(frozen=True)
class Undecided:
    """A decision of the chain within ``z`` sd of its threshold: merged, whatever its sign."""

    start: int  # the interval's start s (position in the type)
    candidate: int  # the layer c compared with it
    margin: float  # sim[c][s] − τ_s
    sd: float  # its one-probe standard deviation


def gated_intervals(
    sim: Sequence[Sequence[float]],
    degenerate: Sequence[bool],
    sd: Sequence[Sequence[float]] | None,
    z: float,
    threshold: float | None = None,
) -> tuple[list[tuple[int, int]], list[float | None], list[Undecided]]:
    """Algorithm 2 with a significance gate: ``(intervals, τ_s per interval, undecided)``.

    As ``greedy_intervals``, except that a decision whose margin ``m = sim[c][s] − τ_s`` has
    ``|m| < z·sd[s][c]`` is not made by the draw: it takes the fixed side, merge (c joins the
    interval), and is listed as undecided. ``sd`` None (or ``z = 0``) is the ungated chain.
    """
    n = len(sim)
    out: list[tuple[int, int]] = []
    taus: list[float | None] = []
    undecided: list[Undecided] = []
    p = 0
    while p < n:
        s = p
        if degenerate[s]:
            out.append((s, s))
            taus.append(None)
            p = s + 1
            continue
        row = sim[s]
        if threshold is not None:
            tau = threshold
        elif n == 1:
            tau = 1.0
        else:
            tau = adaptive_threshold(row, s)
        limit = tau - TIE_TOL * max(1.0, abs(tau))
        e = s
        while e + 1 < n and not degenerate[e + 1]:
            margin = sim[e + 1][s] - tau
            noise = 0.0 if sd is None else float(sd[s][e + 1])
            if z > 0 and abs(margin) < z * noise:
                undecided.append(Undecided(s, e + 1, float(margin), noise))
            elif sim[e + 1][s] < limit:
                break
            e += 1
        out.append((s, e))
        taus.append(float(tau))
        p = e + 1
    return out, taus, undecided


def undecided_diagnostics(undecided: list[Undecided], steps: int, z: float) -> dict:
    """The plan's record of the gate for one type: the count of undecided decisions, each as
    ``[start, candidate, margin, sd]`` (positions into ``layers``), and the probe size that would
    decide them all: the max over them of ``S·(z·sd/|margin|)²`` (sd falls as 1/√S; None when a
    margin is exactly 0, or there are none)."""
    need = [decide_steps(steps, z, u.sd, u.margin) for u in undecided]
    top = max(need, default=None)
    return {
        "undecided": len(undecided),
        "undecided_decisions": [[u.start, u.candidate, u.margin, u.sd] for u in undecided],
        "decide_steps": None if top is None or math.isinf(top) else math.ceil(top),
    }


def resolve_boundaries(stats: GradientStats, similarity: str) -> str:
    """``"significant"`` when the statistics hold the probe's moment noise and the similarity is
    RMI; else ``"greedy"``, with a one-line warning (once per statistics object) unless the
    statistics hold no noise estimate at all (then the statistics' own warning has spoken)."""
    if similarity == "rmi" and stats.moment_cov is not None:
        return "significant"
    if not stats.has_noise:
        return "greedy"
    why = (
        f"similarity={similarity!r} has no one-probe noise estimate (only rmi does)"
        if similarity != "rmi"
        else "these statistics hold no moment noise (a probe of < 3 batches, statistics built "
        "from gradients, or a file from before issue 33)"
    )
    key = f"_warned_no_gate_{similarity}"
    if not getattr(stats, key, False):
        warnings.warn(
            f"boundaries='significant' falls back to the ungated greedy partition: {why}; "
            "recorded as boundaries='greedy' (probe again, or pass boundaries='greedy')",
            UserWarning,
            stacklevel=6,
        )
        setattr(stats, key, True)
    return "greedy"

"""E²LoRA planners (METHODS.md §3): sharing intervals from gradient similarity, ranks from entropy.

Per module type: LSS splits the type's N layers into contiguous intervals (greedy Algorithm 2,
or the Appendix G dynamic programme), HRA gives each interval a rank from its maximal proxy
entropy (eqs. 5–7) by largest remainder. The variants differ only in what they share (§3 "What is
shared"): E²LoRA an (A, B) per interval, E²ShareLoRA one A per type and a B per interval, E²DoRA
as E²LoRA plus a per-module magnitude, E²VeRA trainable (d, b) per interval on type-wide frozen
(A, B), E²LoRI a frozen A and a sparse trainable B per interval.
"""

from __future__ import annotations

import inspect
import itertools
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from ..plans import AdaptationPlan, GroupPlan, ModulePlan
from ..stats import RMI_SCALES, SIMILARITY_KINDS, GradientStats
from ..stats.margin_noise import margin_sd
from .basic import (
    check_choice,
    check_float,
    check_int,
    require_stats,
    resolve_alpha,
    resolve_statistics,
)
from .gate import (
    TIE_TOL,
    Undecided,
    adaptive_threshold,
    gated_intervals,
    resolve_boundaries,
    undecided_diagnostics,
)

PARTITIONS = ("greedy", "dp")
BOUNDARIES = ("significant", "greedy")
ALLOCATIONS = ("shifted", "literal", "uniform")
BUDGETS = ("intervals", "layers")
SHARINGS = ("intervals", "none")


# -- LSS: sharing intervals -------------------------------------------------------------------
def greedy_intervals(
    sim: Sequence[Sequence[float]], degenerate: Sequence[bool], threshold: float | None = None
) -> tuple[list[tuple[int, int]], list[float | None]]:
    """Algorithm 2 (METHODS.md §3 LSS): ``([(s, e), ...], [τ_s per interval])``.

    ``τ_s = mean_{k≠s} sim[s][k]`` unless ``threshold`` is given; an interval grows while the next
    layer's similarity with the interval's *start* is ≥ τ_s. A degenerate layer is always an
    interval of its own (its τ is None).
    """
    intervals, taus, _ = gated_intervals(sim, degenerate, None, 0.0, threshold)
    return intervals, taus


def dp_intervals(
    sim: Sequence[Sequence[float]], degenerate: Sequence[bool], lam: float
) -> list[tuple[int, int]]:
    """Appendix G: minimise ``Σ_k C(i_k, j_k) + λ·K`` exactly, ``C(i, j) = −mean(sim[i..j, i..j])``.

    Degenerate layers stay singletons. Ties (within TIE_TOL) go to the longer last interval.
    """
    m = np.asarray(sim, dtype=np.float64)
    n = m.shape[0]
    # 2-D prefix sums: block sum of [i..j]×[i..j] in O(1)
    arr = np.zeros((n + 1, n + 1))
    arr[1:, 1:] = m.cumsum(0).cumsum(1)
    ps = arr.tolist()  # Python floats: scalar indexing below is 10× faster than on an ndarray
    bad = [0, *itertools.accumulate(int(d) for d in degenerate)]
    best = [0.0] + [math.inf] * n
    start = [0] * (n + 1)
    for j in range(1, n + 1):  # best partition of the first j layers
        for i in range(j):  # last interval = [i, j-1]
            length = j - i
            if length > 1 and bad[j] - bad[i] > 0:
                continue
            block = ps[j][j] - ps[i][j] - ps[j][i] + ps[i][i]
            cost = best[i] - block / (length * length) + lam
            if cost < best[j] - TIE_TOL * max(1.0, abs(best[j])) or best[j] == math.inf:
                best[j], start[j] = cost, i
    out = []
    j = n
    while j > 0:
        out.append((start[j], j - 1))
        j = start[j]
    return out[::-1]


# -- HRA: ranks ---------------------------------------------------------------------------------
def largest_remainder(fractions: Sequence[float | None], total: int) -> list[int]:
    """Integer ranks summing to ``total`` from shares ``F_k`` (METHODS.md §3 "Integer ranks").

    ``None`` marks a degenerate interval: rank 1, outside the normalisation; the others share
    ``total`` minus those units. ``r_k = max(1, floor(F_k·R))``; leftover units go to the largest
    fractional parts (ties: lower index); an excess from the floor of 1 is taken back from the
    largest ranks above 1 (ties: higher index).
    """
    live = [k for k, f in enumerate(fractions) if f is not None]
    ranks = [1] * len(fractions)
    budget = total - (len(fractions) - len(live))
    if not live:
        return ranks
    if budget < len(live):
        raise ValueError(
            f"a rank budget of {total} cannot give {len(fractions)} intervals rank ≥ 1"
        )
    exact = {k: fractions[k] * budget for k in live}
    floors = {k: math.floor(x + TIE_TOL) for k, x in exact.items()}
    for k in live:
        ranks[k] = max(1, floors[k])
    # fractional parts compared at 1e-9 so that float noise cannot reorder equal remainders
    order = sorted(live, key=lambda k: (-round(exact[k] - floors[k], 9), k))
    left = budget - sum(ranks[k] for k in live)
    i = 0
    while left > 0:
        ranks[order[i % len(order)]] += 1
        left -= 1
        i += 1
    while left < 0:
        k = max((k for k in live if ranks[k] > 1), key=lambda k: (ranks[k], k))
        ranks[k] -= 1
        left += 1
    return ranks


def interval_weights(entropies: Sequence[float | None], allocation: str) -> list[float | None]:
    """HRA weights ``w_k`` (METHODS.md §3): shifted ``1 + H_k − min H``, literal ``H_k``, uniform 1.

    ``None`` (a degenerate interval) stays None. ``literal`` warns when an entropy is negative,
    since ``H_k / ΣH`` then gives more rank to less informative intervals.
    """
    live = [h for h in entropies if h is not None]
    if allocation == "uniform":
        return [None if h is None else 1.0 for h in entropies]
    if allocation == "literal":
        if any(h < 0 for h in live):
            warnings.warn(
                "allocation='literal' with negative proxy entropies: w_k = H_k gives MORE rank to "
                "LESS informative intervals (E²LoRA eq. 6 as written); use allocation='shifted' "
                "for ranks increasing with entropy",
                UserWarning,
                stacklevel=7,
            )
        if live and math.fsum(live) == 0.0:
            raise ValueError(
                "allocation='literal' needs Σ H_k ≠ 0 but the interval entropies sum to 0; "
                "use allocation='shifted' or 'uniform'"
            )
        return list(entropies)
    low = min(live) if live else 0.0
    return [None if h is None else 1.0 + (h - low) for h in entropies]


def hra_ranks(
    entropies: Sequence[float | None], r: int, n_layers: int, allocation: str, budget: str
) -> tuple[list[int], list[float | None], int]:
    """``(ranks, weights, R)`` for intervals of max entropies ``H_k`` (eqs. 5–7, §3 "Budget")."""
    k = len(entropies)
    total = k * r if budget == "intervals" else n_layers * r
    weights = interval_weights(entropies, allocation)
    live = [w for w in weights if w is not None]
    s = math.fsum(live)
    fractions = [None if w is None else w / s for w in weights]
    return largest_remainder(fractions, total), weights, total


# -- the planner --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TypeAllocation:
    """One module type's LSS/HRA outcome (positions index the type's layer-ordered modules)."""

    names: list[str]
    intervals: list[tuple[int, int]]
    ranks: list[int]
    diagnostics: dict


def allocate(
    stats: GradientStats,
    module_type: str,
    opts: E2Options,
    names: list[str] | None = None,
) -> TypeAllocation:
    """LSS then HRA for one module type (METHODS.md §3); ``names``: the type's modules by layer.

    ``opts`` must be checked (``E2Options.checked``); entropies and similarities are read from
    the raw or the signal statistics as ``opts.statistics`` says.
    """
    names = stats.types[module_type] if names is None else names
    mods = [stats.modules[n] for n in names]
    n = len(names)
    reading = opts.statistics
    entropies = [m.entropy_of(reading) for m in mods]
    degenerate = [h is None for h in entropies]
    taus: list[float | None] | None = None
    gate: dict | None = None
    if opts.sharing == "none":
        intervals = [(i, i) for i in range(n)]
    elif n == 1:
        intervals, taus = [(0, 0)], [None]
    else:
        sim = stats.similarity(
            module_type, kind=opts.similarity, rmi_scale=opts.rmi_scale, statistics=reading
        )
        sim = sim.numpy().tolist()
        if opts.partition == "greedy":
            sd = None
            if opts.boundaries == "significant":
                sd = margin_sd(stats, module_type, opts.rmi_scale, reading, opts.threshold)
            intervals, taus, undecided = gated_intervals(
                sim, degenerate, sd, opts.z, opts.threshold
            )
            if sd is not None:
                gate = undecided_diagnostics(undecided, stats.steps, opts.z)
        else:
            intervals = dp_intervals(sim, degenerate, opts.lam)
    ent: list[float | None] = []
    for s, e in intervals:
        live = [h for h in entropies[s : e + 1] if h is not None]
        ent.append(max(live) if live else None)
    ranks, weights, total = hra_ranks(ent, opts.r, n, opts.allocation, opts.budget)
    diagnostics = {
        "layers": [m.layer for m in mods],
        "intervals": [[s, e] for s, e in intervals],
        "entropies": ent,
        "weights": weights,
        "ranks": ranks,
        "budget": total,
        "degenerate": [m.layer for m, d in zip(mods, degenerate) if d],
    }
    if taus is not None:
        diagnostics["thresholds"] = taus
    if gate is not None:
        diagnostics.update(gate)
    return TypeAllocation(names, intervals, ranks, diagnostics)


# -- options: one signature for the five planners -------------------------------------------------
@dataclass(frozen=True)
class E2Options:
    """Options of the E²LoRA family (METHODS.md §3); every ``plan_e2*`` takes exactly these.

    ``threshold`` None (adaptive τ_s, Algorithm 2) or a constant; ``partition`` greedy | dp
    (Appendix G, penalty ``lam``); ``boundaries`` significant (the greedy chain merges where a
    margin is within ``z`` of its one-probe sd from 0, and records it as undecided) | greedy
    (Algorithm 2 as the paper; dp is never gated); ``similarity`` rmi | cosine | l1 | l2 | kl;
    ``rmi_scale`` reference | raw (§2); ``statistics`` signal | raw (§2 "Probe noise":
    entropies and RMI of the signal, or of G as the papers read it); ``allocation`` shifted |
    literal | uniform; ``budget`` intervals (R = K·r) | layers (R = N·r); ``sharing``
    intervals | none (HRA only); ``lora_alpha`` default 2·r; ``sparsity`` (E²LoRI only) the
    masked share of B's entries.
    """

    r: int = 8
    threshold: float | None = None
    partition: str = "greedy"
    boundaries: str = "significant"
    z: float = 2.0
    lam: float = 0.5
    similarity: str = "rmi"
    rmi_scale: str = "reference"
    statistics: str = "signal"
    allocation: str = "shifted"
    budget: str = "intervals"
    sharing: str = "intervals"
    lora_alpha: float | None = None
    sparsity: float = 0.9

    def checked(self, stats: GradientStats) -> E2Options:
        """Validated options with defaults resolved; ValueError naming the bad one."""
        partition = check_choice("partition", self.partition, PARTITIONS)
        similarity = check_choice("similarity", self.similarity, SIMILARITY_KINDS)
        threshold = self.threshold
        if threshold is not None:
            threshold = check_threshold(threshold, similarity)
            if partition != "greedy":
                raise ValueError(
                    "threshold applies to partition='greedy' only; drop it or use greedy"
                )
        r = check_int("r", self.r)
        boundaries = check_choice("boundaries", self.boundaries, BOUNDARIES)
        z = check_float("z", self.z, low=0.0)
        statistics = resolve_statistics(stats, self.statistics, stacklevel=5)
        if boundaries == "significant" and partition == "greedy" and self.sharing == "intervals":
            boundaries = resolve_boundaries(stats, similarity)
        return E2Options(
            r=r,
            threshold=threshold,
            partition=partition,
            boundaries=boundaries,
            z=z,
            lam=check_float("lam", self.lam, low=0.0),
            similarity=similarity,
            rmi_scale=check_choice("rmi_scale", self.rmi_scale, RMI_SCALES),
            statistics=statistics,
            allocation=check_choice("allocation", self.allocation, ALLOCATIONS),
            budget=check_choice("budget", self.budget, BUDGETS),
            sharing=check_choice("sharing", self.sharing, SHARINGS),
            lora_alpha=resolve_alpha(self.lora_alpha, r),
            sparsity=check_float("sparsity", self.sparsity, low=0.0, high=1.0),
        )


def check_threshold(value: Any, similarity: str) -> float:
    """A constant LSS threshold inside the range of the similarity (ValueError otherwise).

    RMI (reference scale), L1, L2 and KL similarities lie in (0, 1] and cosine in [−1, 1]: a
    threshold above 1 never shares a layer and one at or below the lowest possible similarity
    shares all of them, so neither is an E²LoRA plan.
    """
    low, closed, span = (
        (-1.0, True, "[-1, 1]") if similarity == "cosine" else (0.0, False, "(0, 1]")
    )
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if not ok or value > 1.0 or value < low or (value == low and not closed):
        raise ValueError(
            f"threshold must be a finite number in {span} for similarity={similarity!r} "
            f"(above 1 no layers share, at the bottom all do), got {value!r}"
        )
    return float(value)


def _build(stats: GradientStats, method: str, opts: E2Options) -> AdaptationPlan:
    """Allocate every type, then lay out modules and groups of ``method`` (§3 What is shared)."""
    shared_intervals = opts.sharing == "intervals"
    extra = {"sparsity": opts.sparsity} if method == "e2lori" else {}
    modules: dict[str, ModulePlan] = {}
    groups: dict[str, GroupPlan] = {}
    diagnostics: dict[str, dict] = {}
    kind = {"e2lora": "lora", "e2sharelora": "lora", "e2dora": "dora"}.get(method, method[2:])
    for t, names in stats.types.items():
        a = allocate(stats, t, opts, names=names)
        diagnostics[t] = a.diagnostics
        top = max(a.ranks)
        type_gid = None
        if method == "e2sharelora":
            type_gid = f"{t}:A"
            groups[type_gid] = GroupPlan(tuple(a.names), ("A",), top, t)
        elif method == "e2vera":
            type_gid = f"{t}:AB"
            groups[type_gid] = GroupPlan(tuple(a.names), ("A", "B"), top, t)
        for k, ((s, e), rank) in enumerate(zip(a.intervals, a.ranks)):
            members = a.names[s : e + 1]
            gid = None
            shared: dict[str, str] = {}
            if method in ("e2sharelora", "e2vera"):
                shared = dict.fromkeys(("A",) if method == "e2sharelora" else ("A", "B"), type_gid)
            if shared_intervals:
                gid = f"{t}:i{k}"
                factors = {"e2sharelora": ("B",), "e2vera": ("d", "b")}.get(method, ("A", "B"))
                groups[gid] = GroupPlan(tuple(members), factors, rank, t)
                shared.update(dict.fromkeys(factors, gid))
            elif method == "e2sharelora":
                gid = type_gid  # ShareLoRA's own layout: the type-wide A is the module's group
            for name in members:
                ms = stats.modules[name]
                modules[name] = ModulePlan(
                    rank, ms.d_in, ms.d_out, t, ms.layer, kind=kind, group=gid,
                    shared=dict(shared), **extra,
                )  # fmt: skip
    recorded = {k: v for k, v in asdict(opts).items() if k != "sparsity"}
    options = {**recorded, **extra, "types": diagnostics}
    return AdaptationPlan(method, modules, groups, opts.lora_alpha, options)


def _plan(method: str, stats: Any, r: Any, options: dict[str, Any]) -> AdaptationPlan:
    """Check the options against ``E2Options`` (as a signature would) and build the plan."""
    allowed = [f.name for f in fields(E2Options) if f.name != "r"]
    if method != "e2lori":
        allowed.remove("sparsity")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"plan_{method}() got unexpected option(s) {', '.join(map(repr, unknown))}; "
            f"accepted: r, {', '.join(allowed)}"
        )
    stats = require_stats(stats, method)
    return _build(stats, method, E2Options(r=r, **options).checked(stats))


def plan_e2lora(stats: GradientStats, r: int = 8, **options: Any) -> AdaptationPlan:
    """E²LoRA: one (A, B) per sharing interval at the interval's rank r_k."""
    return _plan("e2lora", stats, r, options)


def plan_e2sharelora(stats: GradientStats, r: int = 8, **options: Any) -> AdaptationPlan:
    """E²ShareLoRA: one A per type (``"<type>:A"``, rank max r_k), one B per interval at r_k."""
    return _plan("e2sharelora", stats, r, options)


def plan_e2dora(stats: GradientStats, r: int = 8, **options: Any) -> AdaptationPlan:
    """E²DoRA: kind ``dora``; (A, B) shared per interval, each module its own magnitude."""
    return _plan("e2dora", stats, r, options)


def plan_e2vera(stats: GradientStats, r: int = 8, **options: Any) -> AdaptationPlan:
    """E²VeRA: frozen (A, B) per type (``"<type>:AB"``, rank max r_k); (d, b) per interval."""
    return _plan("e2vera", stats, r, options)


def plan_e2lori(stats: GradientStats, r: int = 8, **options: Any) -> AdaptationPlan:
    """E²LoRI: frozen A and sparse trainable B (``sparsity`` of entries masked) per interval."""
    return _plan("e2lori", stats, r, options)


def _signature(with_sparsity: bool) -> inspect.Signature:
    """``(stats, r=8, *, <E2Options fields>)``: what ``planner_options`` and the CLI read."""
    params = [
        inspect.Parameter("stats", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("r", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=E2Options.r),
    ]
    for f in fields(E2Options):
        if f.name == "r" or (f.name == "sparsity" and not with_sparsity):
            continue
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default))
    return inspect.Signature(params)


_DOC_OPTIONS = """

    Options: see ``E2Options`` (METHODS.md §3); unknown ones raise TypeError.
    ``plan.options`` records them resolved (``statistics`` says which reading was used) and,
    under ``"types"``, per module type the intervals (positions into ``layers``), thresholds τ,
    interval entropies H_k, weights w_k, ranks, the budget R and the degenerate layers.
    """

for _f in (plan_e2lora, plan_e2sharelora, plan_e2dora, plan_e2vera, plan_e2lori):
    _f.__signature__ = _signature(_f is plan_e2lori)  # type: ignore[attr-defined]
    _f.__doc__ = (_f.__doc__ or "") + _DOC_OPTIONS


__all__ = ["TIE_TOL", "Undecided", "adaptive_threshold", "gated_intervals", "greedy_intervals"]

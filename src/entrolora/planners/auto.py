"""``auto``: a parameter budget spent where the gradient's signal is (METHODS.md §7).

Every candidate module ``m`` (by default every probed module: probe ``"all-linear"`` for the
whole layer stack) offers rank units: the ``k``-th is worth ``v = s_{m,k}^p`` (``s`` the signal
singular values, §2) and costs ``c_m = d_in + d_out`` parameters. Water-filling buys, again and
again, the unit of largest ``v/c`` that still fits the remaining budget (ties: lower layer, then
module name), up to ``r_m ≤ min(d_in, d_out, r_max)``, never a unit whose ``s`` is 0. Modules
left at rank 0 get no adapter.

Implementation: the singular values fall with ``k``, so each module's units come in order of
falling ``v/c``; all units are sorted once by (−v/c, layer, name, k) and swept, buying each one
that fits. A unit that does not fit is skipped and the sweep goes on: every later unit of the
same module costs the same and the remaining budget only shrinks, so it never fits again — the
sweep buys exactly what the repeated greedy choice buys.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..plans import AdaptationPlan, ModulePlan
from ..stats import GradientStats
from .basic import (
    _select,
    check_choice,
    check_int,
    require_stats,
    resolve_alpha,
    resolve_statistics,
    targets_option,
)

POWERS = (1, 2)
INITS = ("lora", "gradient")
DEFAULT_BUDGET = "like-lora=8"
_LIKE_LORA = re.compile(r"like[-_]lora(?:=(\d+))?")


@dataclass(frozen=True)
class Candidate:
    """One module as the water-filling sees it: its place, unit cost and unit values."""

    name: str
    module_type: str
    layer: int
    d_in: int
    d_out: int
    values: np.ndarray  # (cap,) float64, v_{m,k} for k = 1..cap, only units with s > 0

    @property
    def cost(self) -> int:
        return self.d_in + self.d_out


def plan_auto(
    stats: Any,
    budget: int | float | str = DEFAULT_BUDGET,
    power: int = 1,
    r_max: int = 64,
    init: str = "lora",
    *,
    lora_alpha: float | None = None,
    target_modules: str | Sequence[str] | None = None,
    statistics: str = "signal",
    lora_targets: Sequence[str] | None = None,
) -> AdaptationPlan:
    """Ranks bought by water-filling under a parameter budget (METHODS.md §7).

    ``budget``: trainable parameters as an int; a float in (0, 1) is a fraction of the model's
    parameters (``stats.meta["model_params"]``, recorded by the probe); ``"like-lora=R"``
    (default R = 8) is what LoRA at rank R on the family's default targets costs — those
    recorded by the job's probe (``stats.meta["like_lora"]``) or the probed modules matching
    ``lora_targets``. ``power``: ``v = s^p`` (1 or 2). ``r_max``: rank cap per module (≤
    ``SPECTRUM_KEEP`` where the spectrum is longer). ``init``: ``"lora"`` or ``"gradient"``
    (recorded; ``apply`` reads it). ``target_modules``: narrows the candidates. ``lora_alpha``:
    default ``2·R`` for ``like-lora=R``, 16 otherwise. Returns a plan of ``lora`` modules; its
    options record the budget, the parameters spent, ``power``, ``init`` and per module the
    value of the last unit bought (``marginal``). ValueError on bad options, statistics without
    singular values, or a budget below one unit of the cheapest module (naming the smallest
    useful budget).
    """
    stats = require_stats(stats, "auto")
    power = _check_power(power)
    r_max = check_int("r_max", r_max)
    init = check_choice("init", init, INITS)
    statistics = resolve_statistics(stats, statistics)
    names = list(stats.modules) if target_modules is None else _select(list(stats), target_modules)
    candidates = _candidates(stats, names, statistics, power, r_max)
    limit, like_r = resolve_budget(budget, stats, lora_targets)
    alpha = resolve_alpha(lora_alpha, like_r if like_r is not None else 8)
    ranks = water_fill(candidates, limit)
    by_name = {c.name: c for c in candidates}
    modules = {
        c.name: ModulePlan(ranks[c.name], c.d_in, c.d_out, c.module_type, c.layer)
        for c in sorted(candidates, key=lambda c: (c.module_type, c.layer, c.name))
        if ranks.get(c.name, 0) > 0
    }
    spent = sum(m.rank * (m.d_in + m.d_out) for m in modules.values())
    options = {
        "budget": limit,
        "budget_spec": budget if isinstance(budget, (int, float, str)) else str(budget),
        "spent": spent,
        "power": power,
        "r_max": r_max,
        "init": init,
        "statistics": statistics,
        "lora_alpha": alpha,
        "candidates": targets_option(target_modules),
        "candidate_count": len(names),
        # the exact modules adapted: AdaptationPlan.validate then expects no others
        "target_modules": list(modules),
        "marginal": {n: float(by_name[n].values[m.rank - 1]) for n, m in modules.items()},
    }
    return AdaptationPlan("auto", modules, {}, alpha, options)


def water_fill(candidates: Sequence[Candidate], budget: int) -> dict[str, int]:
    """``{name: rank}`` bought by METHODS.md §7's greedy (modules at rank 0 left out).

    ValueError when ``budget`` is below one unit of the cheapest module that has one.
    """
    live = [c for c in candidates if len(c.values)]
    if not live:
        raise ValueError(
            "no candidate module has a unit with signal (every module is degenerate or its "
            "signal singular values are all 0 after removing the noise); probe more steps "
            "(--probe-steps) or more modules"
        )
    cheapest = min(c.cost for c in live)
    if budget < cheapest:
        raise ValueError(
            f"budget {budget:,} parameters is below one rank unit of the cheapest module "
            f"({cheapest:,} = d_in + d_out); the smallest useful budget is {cheapest:,}"
        )
    # all units at once: module index, rank index k (0-based), ratio v/c
    sizes = np.array([len(c.values) for c in live])
    module = np.repeat(np.arange(len(live)), sizes)
    k = np.concatenate([np.arange(n) for n in sizes])
    cost = np.array([c.cost for c in live], dtype=np.int64)
    ratio = np.concatenate([c.values / c.cost for c in live])
    # ties: lower layer, then module name; within a module lower k (its units in order)
    place = sorted(range(len(live)), key=lambda i: (live[i].layer, live[i].name))
    tie = np.empty(len(live), dtype=np.int64)
    tie[place] = np.arange(len(live))
    order = np.lexsort((k, tie[module], -ratio))
    unit_cost = cost[module[order]]
    # the prefix that fits as a whole is bought without a Python loop
    head = int(np.searchsorted(np.cumsum(unit_cost), budget, side="right"))
    bought = np.zeros(len(live), dtype=np.int64)
    np.add.at(bought, module[order[:head]], 1)
    remaining = budget - int(unit_cost[:head].sum())
    for u in order[head:].tolist():
        if remaining < cheapest:
            break
        c = cost[module[u]]
        if c <= remaining:  # a unit that does not fit is skipped (and so are its module's next)
            bought[module[u]] += 1
            remaining -= int(c)
    return {c.name: int(r) for c, r in zip(live, bought.tolist()) if r > 0}


def resolve_budget(
    budget: Any, stats: GradientStats, lora_targets: Sequence[str] | None = None
) -> tuple[int, int | None]:
    """``(budget in parameters, R of "like-lora=R" or None)`` of a budget option (see
    ``plan_auto``); ValueError naming the fix for anything else."""
    if isinstance(budget, str):
        text = budget.strip().lower()
        like = _LIKE_LORA.fullmatch(text)
        if like:
            r = check_int("like-lora rank", int(like.group(1) or 8))
            return r * _like_lora_width(stats, lora_targets), r
        try:
            budget = float(text) if any(ch in text for ch in ".e") else int(text)
        except ValueError:
            raise ValueError(
                f"budget {budget!r} is not a parameter count, a fraction of the model or "
                "'like-lora=R'; e.g. budget=300000, budget=0.01 or budget='like-lora=8'"
            ) from None
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(f"budget must be a number or 'like-lora=R', got {budget!r}")
    if isinstance(budget, numbers.Integral) or (math.isfinite(budget) and budget == int(budget)):
        if budget < 1:
            raise ValueError(f"budget must be ≥ 1 parameter, got {budget!r}")
        return int(budget), None
    if not (0 < budget < 1):
        raise ValueError(
            f"budget {budget!r}: a float is a fraction of the model's parameters, in (0, 1); "
            "give a parameter count as an integer"
        )
    total = stats.meta.get("model_params")
    if not total:
        raise ValueError(
            f"budget {budget!r} is a fraction of the model, but these statistics do not record "
            "the model's parameter count (probed before entrolora recorded it, or built with "
            "GradientStats.from_gradients); give the budget as a parameter count"
        )
    return max(1, int(budget * int(total))), None


def _like_lora_width(stats: GradientStats, lora_targets: Sequence[str] | None) -> int:
    """Σ (d_in + d_out) over the modules LoRA would adapt: the parameters of one LoRA rank."""
    recorded = stats.meta.get("like_lora") or {}
    if lora_targets is None and recorded.get("params_per_rank"):
        return int(recorded["params_per_rank"])
    if lora_targets is None:
        raise ValueError(
            "budget 'like-lora=R' needs the family's default target modules, which these "
            "statistics do not record (the CLI's probe does); pass lora_targets=['q_proj', "
            "'v_proj', ...] or the budget as a parameter count"
        )
    matched = _select(list(stats), list(lora_targets))
    return sum(stats[n].d_in + stats[n].d_out for n in matched)


def _check_power(power: Any) -> int:
    if isinstance(power, bool) or power not in POWERS:
        raise ValueError(f"power must be 1 or 2 (v = s^power, METHODS.md §7), got {power!r}")
    return int(power)


def _candidates(
    stats: GradientStats, names: list[str], statistics: str, power: int, r_max: int
) -> list[Candidate]:
    """The candidates' unit values; degenerate modules offer none. ValueError when singular
    values are missing or shorter than the cap asks."""
    out, missing = [], []
    for n in names:
        s = stats[n]
        if s.degenerate:
            continue
        sv = s.spectrum_of(statistics)
        if sv is None:
            missing.append(n)
            continue
        cap = min(s.d_in, s.d_out, r_max)
        if len(sv) < cap:
            raise ValueError(
                f"r_max={r_max} asks for more singular values of {n!r} than the statistics keep "
                f"({len(sv)}); use r_max ≤ {len(sv)}"
            )
        values = np.asarray(sv[:cap], dtype=np.float64)
        values = values[values > 0] ** power  # descending: the zeros are the tail
        out.append(Candidate(n, s.module_type, s.layer, s.d_in, s.d_out, values))
    if missing:
        raise ValueError(
            f"the statistics hold no singular values for {len(missing)} module(s), e.g. "
            f"{missing[0]!r}: they were saved before statistics format 3, or come from a "
            "one-batch probe of matrices ≥ 2048 wide; re-probe (`entrolora probe "
            "--target-modules all-linear`, at least 2 steps) to plan with auto"
        )
    return out

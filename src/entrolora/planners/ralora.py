"""RaLoRA family planners (METHODS.md §4): block counts from gradient effective rank, ranks from
loss sensitivity.

- RaLoRA: rank r everywhere, block count ``n`` from ``erank(G)/r`` (eq. 4 with Algorithm 1).
- RaLoRA-Pro: ranks from sensitivity (eqs. 5–8), then the block count from each rank.
- LS-LoRA (Table 4): RaLoRA-Pro's ranks, one block.
- LoRA+GID (Table 9): rank ``max(1, round(erank))``, one block.
"""

from __future__ import annotations

import math
from typing import Any

from ..plans import AdaptationPlan, ModulePlan
from ..stats import GradientStats
from .basic import (
    check_int,
    check_power_of_two,
    require_stats,
    resolve_alpha,
    resolve_statistics,
)

# An effective rank within this relative distance of r·2^k counts as r·2^k: erank is a float
# estimate, and a spectrum built to have GID exactly 4r must not fall to 2 blocks by rounding.
LOG_TOL = 1e-9


def block_count(erank: float | None, r: int, n_max: int, d_in: int, d_out: int) -> tuple[int, int]:
    """``(n, n before the divisibility fallback)`` for rank ``r`` (METHODS.md §4 "Block count").

    ``e = clamp(floor(log2(erank / r)), 0, log2 n_max)``, ``n = 2^e``, then halved while it does not
    divide both ``d_in`` and ``d_out``. A degenerate module (erank None) gets one block.
    """
    if erank is None:
        return 1, 1
    e = math.floor(math.log2(erank / r) + LOG_TOL)
    e = min(max(e, 0), int(math.log2(n_max)))
    n = wanted = 2**e
    while n > 1 and (d_in % n or d_out % n):
        n //= 2
    return n, wanted


def sensitivity_ranks(
    stats: GradientStats, r_ref: int, r_min: int, r_max: int
) -> dict[str, tuple[int, float]]:
    """``{name: (r_l, unclamped P_total·α_l/√(d_in+d_out))}`` (RaLoRA eqs. 5–8, all types)."""
    missing = [n for n, s in stats.modules.items() if s.sensitivity is None]
    if missing:
        raise ValueError(
            f"RaLoRA-Pro / LS-LoRA need loss sensitivity I(W) = mean|W⊙G|, which the statistics "
            f"lack for {len(missing)} module(s) (e.g. {missing[0]!r}); probe with el.probe(model, "
            "...) or build them with GradientStats.from_gradients(grads, weights={name: W})"
        )
    names = list(stats.modules)
    sens = [stats.modules[n].sensitivity for n in names]
    total_sens = math.fsum(sens)
    if not total_sens > 0:
        raise ValueError(
            "every module has zero loss sensitivity (no gradient reached the targets); check "
            "that the loss depends on the target modules and that the probe batches are not empty"
        )
    roots = [math.sqrt(stats.modules[n].d_in + stats.modules[n].d_out) for n in names]
    p_total = math.fsum(root * r_ref for root in roots)
    out = {}
    for n, s, root in zip(names, sens, roots):
        x = p_total * (s / total_sens) / root
        out[n] = (min(max(round(x), r_min), r_max), x)
    return out


def _pro_bounds(r_ref: Any, r_min: Any, r_max: Any) -> tuple[int, int, int]:
    r_ref = check_int("r_ref", r_ref)
    r_min = max(1, r_ref // 2) if r_min is None else check_int("r_min", r_min)
    r_max = 2 * r_ref if r_max is None else check_int("r_max", r_max)
    if r_min > r_max:
        raise ValueError(f"r_min ({r_min}) must be ≤ r_max ({r_max})")
    return r_ref, r_min, r_max


def _plan(method: str, stats: GradientStats, ranks: dict[str, int], blocks: dict[str, int],
          alpha: float, options: dict) -> AdaptationPlan:  # fmt: skip
    modules = {}
    for n, s in sorted(stats.modules.items(), key=lambda kv: (kv[1].module_type, kv[1].layer)):
        modules[n] = ModulePlan(ranks[n], s.d_in, s.d_out, s.module_type, s.layer, blocks=blocks[n])
    return AdaptationPlan(method, modules, {}, alpha, options)


def plan_ralora(
    stats: GradientStats,
    r: int = 8,
    n_max: int = 32,
    *,
    statistics: str = "signal",
    lora_alpha: float | None = None,
) -> AdaptationPlan:
    """RaLoRA: rank ``r`` on every module, ``blocks`` from its gradient effective rank (eq. 4).

    ``n_max`` (a power of two) caps the block count. ``statistics``: ``"signal"`` reads the
    signal effective rank (METHODS.md §2 "Probe noise"; raw with a one-line warning when the
    statistics hold no noise estimate), ``"raw"`` the erank of G as the paper does.
    ``plan.options`` records the reading used, each module's erank and the block count before
    the divisibility fallback (``blocks_wanted``).
    """
    stats = require_stats(stats, "ralora")
    r = check_int("r", r)
    n_max = check_power_of_two("n_max", n_max)
    statistics = resolve_statistics(stats, statistics)
    alpha = resolve_alpha(lora_alpha, r)
    eranks = {n: s.erank_of(statistics) for n, s in stats.modules.items()}
    counts = {
        n: block_count(eranks[n], r, n_max, s.d_in, s.d_out) for n, s in stats.modules.items()
    }
    options = {
        "r": r,
        "n_max": n_max,
        "statistics": statistics,
        "lora_alpha": alpha,
        "eranks": eranks,
        "blocks_wanted": {n: c[1] for n, c in counts.items()},
    }
    ranks = dict.fromkeys(stats.modules, r)
    return _plan("ralora", stats, ranks, {n: c[0] for n, c in counts.items()}, alpha, options)


def plan_ralora_pro(
    stats: GradientStats,
    r_ref: int = 8,
    r_min: int | None = None,
    r_max: int | None = None,
    n_max: int = 32,
    *,
    statistics: str = "signal",
    lora_alpha: float | None = None,
) -> AdaptationPlan:
    """RaLoRA-Pro: ranks from loss sensitivity (eqs. 5–8), then block counts from those ranks.

    ``r_l = clamp(round(P_total·α_l/√(d_in+d_out)), r_min, r_max)``, defaults
    ``r_min = max(1, r_ref // 2)``, ``r_max = 2·r_ref``; ``lora_alpha`` default 2·r_ref. Needs
    statistics with sensitivity (probed with the weights). ``statistics`` as ``plan_ralora``
    (the effective rank; sensitivity is always read from G).
    """
    stats = require_stats(stats, "ralora_pro")
    r_ref, r_min, r_max = _pro_bounds(r_ref, r_min, r_max)
    n_max = check_power_of_two("n_max", n_max)
    statistics = resolve_statistics(stats, statistics)
    alpha = resolve_alpha(lora_alpha, r_ref)
    pro = sensitivity_ranks(stats, r_ref, r_min, r_max)
    ranks = {n: v[0] for n, v in pro.items()}
    eranks = {n: s.erank_of(statistics) for n, s in stats.modules.items()}
    counts = {
        n: block_count(eranks[n], ranks[n], n_max, s.d_in, s.d_out)
        for n, s in stats.modules.items()
    }
    options = {
        "r_ref": r_ref,
        "r_min": r_min,
        "r_max": r_max,
        "n_max": n_max,
        "statistics": statistics,
        "lora_alpha": alpha,
        "unclamped_ranks": {n: v[1] for n, v in pro.items()},
        "eranks": eranks,
        "blocks_wanted": {n: c[1] for n, c in counts.items()},
    }
    return _plan("ralora_pro", stats, ranks, {n: c[0] for n, c in counts.items()}, alpha, options)


def plan_ls_lora(
    stats: GradientStats,
    r_ref: int = 8,
    r_min: int | None = None,
    r_max: int | None = None,
    *,
    lora_alpha: float | None = None,
) -> AdaptationPlan:
    """LS-LoRA (RaLoRA Table 4): RaLoRA-Pro's sensitivity ranks with plain (one-block) adapters."""
    stats = require_stats(stats, "ls_lora")
    r_ref, r_min, r_max = _pro_bounds(r_ref, r_min, r_max)
    alpha = resolve_alpha(lora_alpha, r_ref)
    pro = sensitivity_ranks(stats, r_ref, r_min, r_max)
    options = {
        "r_ref": r_ref,
        "r_min": r_min,
        "r_max": r_max,
        "lora_alpha": alpha,
        "unclamped_ranks": {n: v[1] for n, v in pro.items()},
    }
    ranks = {n: v[0] for n, v in pro.items()}
    return _plan("ls_lora", stats, ranks, dict.fromkeys(ranks, 1), alpha, options)


def plan_lora_gid(
    stats: GradientStats, *, statistics: str = "signal", lora_alpha: float | None = None
) -> AdaptationPlan:
    """LoRA+GID (RaLoRA Table 9): rank ``max(1, round(erank))``, one block; degenerate → 1.

    ``statistics`` as ``plan_ralora``. ``lora_alpha`` defaults to 16 (METHODS.md §3: 2·8), one
    number for the whole model.
    """
    stats = require_stats(stats, "lora_gid")
    statistics = resolve_statistics(stats, statistics)
    alpha = resolve_alpha(lora_alpha, 8)
    eranks = {n: s.erank_of(statistics) for n, s in stats.modules.items()}
    ranks = {n: 1 if e is None else max(1, round(e)) for n, e in eranks.items()}
    options = {"statistics": statistics, "lora_alpha": alpha, "eranks": eranks}
    return _plan("lora_gid", stats, ranks, dict.fromkeys(ranks, 1), alpha, options)

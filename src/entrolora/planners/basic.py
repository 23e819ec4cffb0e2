"""Reference planners (LoRA, ShareLoRA, FlexLoRA) and the helpers every planner shares.

The reference planners need no gradients: given a ``GradientStats`` they use its modules, given
an ``nn.Module`` they find the targets with ``entrolora.targets.find_targets`` (``target_modules=``
is then required). Option checks live here so that every planner says the same thing the same way.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..plans import FLEX_INITS as INITS
from ..plans import AdaptationPlan, GroupPlan, ModulePlan
from ..stats import STATISTICS, GradientStats
from ..targets import is_all_linear

TypeTargets = dict[str, list["Site"]]


@dataclass(frozen=True)
class Site:
    """One target module as a planner sees it: where it is and its shape."""

    name: str
    module_type: str
    layer: int
    d_in: int
    d_out: int


# -- input --------------------------------------------------------------------------------------
def sites_of(stats_or_model: Any, target_modules: str | Sequence[str] | None) -> TypeTargets:
    """``{module type: [Site ordered by layer]}`` of a GradientStats or a model (+ targets)."""
    if isinstance(stats_or_model, GradientStats):
        names = list(stats_or_model.modules)
        if target_modules is not None:
            names = _select(names, target_modules)
        keep = set(names)
        out: TypeTargets = {}
        for t, members in stats_or_model.types.items():
            for n in members:
                if n in keep:
                    s = stats_or_model.modules[n]
                    out.setdefault(t, []).append(Site(n, t, s.layer, s.d_in, s.d_out))
        return out
    from torch import nn

    if isinstance(stats_or_model, nn.Module):
        if target_modules is None:
            raise ValueError(
                "planning from a model needs target_modules=, e.g. target_modules=['q_proj', "
                "'v_proj'] (or pass GradientStats from el.probe)"
            )
        from ..targets import find_targets

        out = {}
        for t in find_targets(stats_or_model, target_modules).values():
            out.setdefault(t.module_type, []).append(
                Site(t.name, t.module_type, t.layer, t.d_in, t.d_out)
            )
        return out
    raise TypeError(
        f"a planner needs GradientStats or an nn.Module, got {type(stats_or_model).__name__}"
    )


def require_stats(stats: Any, method: str) -> GradientStats:
    """``stats`` if it is GradientStats; a ValueError telling to probe first otherwise."""
    if isinstance(stats, GradientStats):
        return stats
    from torch import nn

    if isinstance(stats, nn.Module):
        raise ValueError(
            f"{method} plans from gradient statistics, not from a model: probe first, "
            f"stats = el.probe(model, batches, target_modules=[...]), then plan_{method}(stats)"
        )
    raise TypeError(f"{method} needs GradientStats, got {type(stats).__name__}")


def _select(names: list[str], target_modules: str | Sequence[str]) -> list[str]:
    """Names matching ``target_modules`` (suffixes / full names, one regex as peft does, or
    ``"all-linear"``: all of them, since statistics hold layer-stack modules only)."""
    if is_all_linear(target_modules):
        picked = list(names)
    elif isinstance(target_modules, str):
        picked = [n for n in names if re.fullmatch(target_modules, n)]
    else:
        picked = [n for n in names if any(n == p or n.endswith("." + p) for p in target_modules)]
    if not picked:
        raise ValueError(
            f"target_modules {target_modules!r} matched none of the statistics' modules; "
            f"e.g. {', '.join(names[:3])}"
        )
    return picked


# -- option checks -----------------------------------------------------------------------------
def check_int(name: str, value: Any, low: int = 1) -> int:
    """``value`` as an int ≥ ``low``; ValueError saying the allowed values otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
    return int(value)


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def check_float(
    name: str, value: Any, low: float | None = None, high: float | None = None
) -> float:
    """A finite real in ``[low, high)`` (either bound optional)."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
    ok = ok and math.isfinite(value)
    ok = ok and (low is None or value >= low) and (high is None or value < high)
    if not ok:
        span = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'})"
        raise ValueError(f"{name} must be a finite number in {span}, got {value!r}")
    return float(value)


def resolve_alpha(lora_alpha: Any, r: int) -> float:
    """``lora_alpha``, default ``2·r`` (METHODS.md §3, last line); must be > 0."""
    if lora_alpha is None:
        return float(2 * r)
    alpha = check_float("lora_alpha", lora_alpha)
    if alpha <= 0:
        raise ValueError(f"lora_alpha must be > 0, got {lora_alpha!r}")
    return alpha


def resolve_statistics(stats: GradientStats, statistics: Any, stacklevel: int = 3) -> str:
    """The statistics a planner reads: ``statistics`` checked; ``"signal"`` on statistics
    without a noise estimate warns (once per statistics object, one line) and gives ``"raw"``.
    ``stacklevel``: of the warning, counted from here (3: the caller of a planner that calls
    this directly)."""
    statistics = check_choice("statistics", statistics, STATISTICS)
    if statistics == "signal" and not stats.has_noise:
        if not getattr(stats, "_warned_no_noise", False):
            warnings.warn(
                "these statistics hold no noise estimate (a 1-batch probe, or a file from before "
                "statistics format 2), so the plan reads the raw statistics (recorded as "
                "statistics='raw'); probe again for signal statistics",
                UserWarning,
                stacklevel=stacklevel,
            )
            stats._warned_no_noise = True  # type: ignore[attr-defined]
        return "raw"
    return statistics


def check_power_of_two(name: str, value: Any) -> int:
    n = check_int(name, value)
    if n & (n - 1):
        raise ValueError(f"{name} must be a power of two (1, 2, 4, 8, 16, 32, ...), got {n}")
    return n


def targets_option(target_modules: Any) -> Any:
    """JSON form of ``target_modules`` for ``plan.options``."""
    if target_modules is None or isinstance(target_modules, str):
        return target_modules
    return list(target_modules)


# -- the reference planners --------------------------------------------------------------------
def plan_lora(
    stats_or_model: Any,
    r: int = 8,
    *,
    target_modules: str | Sequence[str] | None = None,
    lora_alpha: float | None = None,
) -> AdaptationPlan:
    """Plain LoRA: rank ``r`` on every target module, nothing shared, one block."""
    r = check_int("r", r)
    alpha = resolve_alpha(lora_alpha, r)
    modules = {
        s.name: ModulePlan(r, s.d_in, s.d_out, s.module_type, s.layer)
        for sites in sites_of(stats_or_model, target_modules).values()
        for s in sites
    }
    options = {"r": r, "target_modules": targets_option(target_modules), "lora_alpha": alpha}
    return AdaptationPlan("lora", modules, {}, alpha, options)


def plan_sharelora(
    stats_or_model: Any,
    r: int = 8,
    *,
    target_modules: str | Sequence[str] | None = None,
    lora_alpha: float | None = None,
) -> AdaptationPlan:
    """ShareLoRA: one A per module type (group ``"<type>:A"``), a B of rank ``r`` per layer."""
    r = check_int("r", r)
    alpha = resolve_alpha(lora_alpha, r)
    modules: dict[str, ModulePlan] = {}
    groups: dict[str, GroupPlan] = {}
    for t, sites in sites_of(stats_or_model, target_modules).items():
        gid = f"{t}:A"
        groups[gid] = GroupPlan(tuple(s.name for s in sites), ("A",), r, t)
        for s in sites:
            modules[s.name] = ModulePlan(
                r, s.d_in, s.d_out, t, s.layer, group=gid, shared={"A": gid}
            )
    options = {"r": r, "target_modules": targets_option(target_modules), "lora_alpha": alpha}
    return AdaptationPlan("sharelora", modules, groups, alpha, options)


def plan_flexlora(
    stats_or_model: Any,
    r: int = 8,
    capacity: int | None = None,
    *,
    target_modules: str | Sequence[str] | None = None,
    lora_alpha: float | None = None,
    init: str = "lora",
) -> AdaptationPlan:
    """FlexLoRA (METHODS.md §5): kind ``flex``, ``r`` active of ``capacity`` (default ``2·r``).

    ``init``: "lora" (P = 0, λ = 1, Q as LoRA's A) or "paper" (λ = 0, P, Q ~ N(0, 0.02²)); the
    adapters and every later expansion follow it.
    """
    if init not in INITS:
        raise ValueError(f"FlexLoRA init must be one of {', '.join(INITS)}, got {init!r}")
    r = check_int("r", r)
    given = capacity
    capacity = 2 * r if capacity is None else check_int("capacity", capacity)
    sites = [s for group in sites_of(stats_or_model, target_modules).values() for s in group]
    top = min((min(s.d_in, s.d_out) for s in sites), default=capacity)
    if given is not None and not r <= capacity <= top:
        raise ValueError(
            f"FlexLoRA capacity={capacity} is out of range: allowed r..min(d_in, d_out) = "
            f"{r}..{top} (a capacity above min(d_in, d_out) holds directions that cannot exist)"
        )
    if r > top:
        raise ValueError(f"FlexLoRA r={r} is above min(d_in, d_out) = {top}; allowed r: 1..{top}")
    alpha = resolve_alpha(lora_alpha, r)
    # the default 2·r stops at each layer's min(d_in, d_out), recorded per module in the plan
    modules = {
        s.name: ModulePlan(
            r, s.d_in, s.d_out, s.module_type, s.layer, kind="flex",
            capacity=capacity if given is not None else min(capacity, s.d_in, s.d_out),
        )
        for s in sites
    }  # fmt: skip
    options = {
        "r": r,
        # what the modules use: one value, or None when the default 2·r stopped at some
        # layer's min(d_in, d_out) (each module records its own)
        "capacity": caps.pop()
        if len(caps := {m.capacity for m in modules.values()}) == 1
        else None,
        "target_modules": targets_option(target_modules),
        "lora_alpha": alpha,
        "init": init,
    }
    return AdaptationPlan("flexlora", modules, {}, alpha, options)

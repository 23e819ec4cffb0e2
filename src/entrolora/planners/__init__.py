"""Planners: gradient statistics in, ``AdaptationPlan`` out (METHODS.md §3–4, §7). Pure functions.

``plan(method, stats_or_model, **options)`` dispatches by name (``"-"`` may stand for ``"_"``);
``planner_options(method)`` lists a planner's options with their defaults, for the CLI.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

from torch import nn

from ..guards.api import got
from ..plans import AdaptationPlan
from ..stats import GradientStats
from .auto import plan_auto
from .basic import plan_flexlora, plan_lora, plan_sharelora
from .e2lora import plan_e2dora, plan_e2lora, plan_e2lori, plan_e2sharelora, plan_e2vera
from .ralora import plan_lora_gid, plan_ls_lora, plan_ralora, plan_ralora_pro

PLANNERS: dict[str, Callable[..., AdaptationPlan]] = {
    "lora": plan_lora,
    "sharelora": plan_sharelora,
    "e2lora": plan_e2lora,
    "e2sharelora": plan_e2sharelora,
    "e2dora": plan_e2dora,
    "e2vera": plan_e2vera,
    "e2lori": plan_e2lori,
    "ralora": plan_ralora,
    "ralora_pro": plan_ralora_pro,
    "ls_lora": plan_ls_lora,
    "lora_gid": plan_lora_gid,
    "flexlora": plan_flexlora,
    "auto": plan_auto,
}

__all__ = [
    "PLANNERS",
    "plan",
    "planner_options",
    *(f"plan_{n}" for n in PLANNERS),
]


def _planner(method: str) -> tuple[str, Callable[..., AdaptationPlan]]:
    if not isinstance(method, str):
        raise TypeError(
            f"el.plan: method must be a string such as 'e2lora', got {type(method).__name__} "
            f"{method!r:.60}"
        )
    key = method.strip().lower().replace("-", "_")
    if key not in PLANNERS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(PLANNERS)}")
    return key, PLANNERS[key]


def planner_options(method: str) -> dict[str, Any]:
    """``{option: default}`` of a planner, read from its signature (``None``: resolved later)."""
    _, fn = _planner(method)
    params = list(inspect.signature(fn).parameters.values())[1:]  # skip stats_or_model
    return {p.name: p.default for p in params}


def plan(method: str, stats_or_model: Any, **options: Any) -> AdaptationPlan:
    """The plan of ``method`` (one of ``PLANNERS``) for GradientStats or a model.

    Unknown option names raise ValueError listing the accepted ones.
    """
    _, fn = _planner(method)
    need_stats_or_model(stats_or_model, f"el.plan({method!r}, ...)")
    known = planner_options(method)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method {method!r}; "
            f"accepted: {', '.join(known)}"
        )
    return fn(stats_or_model, **options)


def need_stats_or_model(value: Any, call: str, arg: str = "stats_or_model") -> None:
    """TypeError unless ``value`` is ``GradientStats`` or a torch module."""
    if isinstance(value, (GradientStats, nn.Module)):
        return
    hint = ""
    if isinstance(value, (str, os.PathLike)):
        hint = f"; read a statistics file with el.GradientStats.load({os.fspath(value)!r})"
    raise TypeError(
        f"{call}: {arg} must be GradientStats or a torch nn.Module, got {got(value)}{hint}"
    )

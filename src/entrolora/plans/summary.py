"""``AdaptationPlan.summary``: the plan as plain text — a row per module type, a column per
layer (rank, blocks, shared group), the budget an ``auto`` plan spent (METHODS.md §7) and the
decisions E²LoRA's gate left undecided (issue 33). Reads a plan's fields; imports nothing of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def summary_text(plan: Any) -> str:
    """The text of ``plan.summary()`` for an ``AdaptationPlan``."""
    by_type: dict[str, dict[int, Any]] = {}
    for m in plan.modules.values():
        by_type.setdefault(m.module_type, {})[m.layer] = m
    layers = sorted({m.layer for m in plan.modules.values()})
    lines = [
        f"method {plan.method}  lora_alpha {plan.lora_alpha:g}  modules {len(plan.modules)}  "
        f"groups {len(plan.groups)}  trainable params {plan.num_trainable_params():,}",
        "cell: rank[xblocks][@group]",
    ]
    width = max(len(t) for t in by_type)
    cells = {t: {layer: _cell(m) for layer, m in row.items()} for t, row in by_type.items()}
    colw = max(3, *(len(c) for row in cells.values() for c in row.values()))
    lines.append(" " * width + " | " + " ".join(f"{layer:>{colw}}" for layer in layers))
    for t, row in cells.items():
        lines.append(
            f"{t:<{width}} | " + " ".join(f"{row.get(layer, '-'):>{colw}}" for layer in layers)
        )
    return "\n".join(
        lines + _budget_lines(plan, by_type, layers, width) + undecided_lines(plan.options)
    )


def _budget_lines(
    plan: Any, by_type: dict[str, dict[int, Any]], layers: list[int], width: int
) -> list[str]:
    """For a plan that spent a budget (auto, METHODS.md §7): the budget line and the marginal
    value (of the last rank unit bought) per module type and layer; nothing otherwise."""
    o = plan.options
    marginal = o.get("marginal")
    if not isinstance(marginal, Mapping) or "budget" not in o:
        return []
    spent, budget = o.get("spent", plan.num_trainable_params()), o["budget"]
    out = [
        f"budget {budget:,} parameters, spent {spent:,} ({spent / max(budget, 1):.1%}); "
        f"power {o.get('power')}, init {o.get('init')}, {len(plan.modules)} of "
        f"{o.get('candidate_count', len(plan.modules))} candidate modules adapted",
        "marginal value of the last unit bought (s^power):",
    ]
    cells: dict[str, dict[int, str]] = {t: {} for t in by_type}
    for name, m in plan.modules.items():
        if name in marginal:
            cells[m.module_type][m.layer] = f"{marginal[name]:.2e}"
    colw = max(8, *(len(c) for row in cells.values() for c in row.values()))
    out.append(" " * width + " | " + " ".join(f"{layer:>{colw}}" for layer in layers))
    for t, row in cells.items():
        out.append(f"{t:<{width}} | " + " ".join(f"{row.get(x, '-'):>{colw}}" for x in layers))
    return out


def _cell(m: Any) -> str:
    s = str(m.rank)
    if m.blocks > 1:
        s += f"x{m.blocks}"
    if m.group is not None:
        s += f"@{m.group.rsplit(':', 1)[-1]}"
    return s


def undecided_lines(options: Mapping) -> list[str]:
    """E²LoRA's gate (``boundaries="significant"``, issue 33): one line per module type with the
    decisions the probe could not make (merged) and the probe size that would make them all."""
    types = options.get("types") or {}
    gated = {t: d for t, d in types.items() if isinstance(d, Mapping) and "undecided" in d}
    if not gated:
        return []
    z = options.get("z", 2.0)
    lines = [f"undecided decisions per type (merged; within z = {z:g} sd of their threshold):"]
    for t, d in gated.items():
        need = d.get("decide_steps")
        when = f", all decided at ~{need:,} probe steps" if need else ""
        lines.append(f"  {t}: {d['undecided']}{when if d['undecided'] else ''}")
    return lines

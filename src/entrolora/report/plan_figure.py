"""The plan figure: the rank each module trained with, per layer and module type.

What is drawn is what was trained, so that the figure agrees with the export's ranks:

- height = effective rank: ``blocks × block rank`` for block-diagonal adapters (RaLoRA), the
  plan's rank otherwise; for FlexLoRA the final active ranks of its history, the initial ones
  faint beside them;
- colour = shared group, only for modules that share a factor with another module; every other
  module has one neutral colour;
- one legend says what colour and height mean.

``plan_bars`` returns the numbers, ``plan_figure`` draws them (tests read both), ``plot_plan``
writes the PNG.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import pyplot, save_png
from ..plans import AdaptationPlan

OWN = "tab:blue"  # a module with its own adapter (nothing shared)
INITIAL_ALPHA = 0.3


@dataclass(frozen=True)
class PlanBar:
    """One module as drawn: ``rank`` is the height (the effective rank it trained with)."""

    name: str
    layer: int
    rank: int
    blocks: int
    block_rank: int
    group: str | None = None  # shared group (≥ 2 members sharing a factor), else None
    initial: int | None = None  # FlexLoRA: the plan's initial rank


def final_ranks(history: Sequence | None) -> dict[str, int]:
    """The active ranks after the last adjustment of a FlexLoRA history (``[[step, ranks]]``)."""
    if not history:
        return {}
    return {str(k): int(v) for k, v in history[-1][1].items()}


def _shared_group(plan: AdaptationPlan, name: str) -> str | None:
    m = plan.modules[name]
    gid = m.group or next(iter(m.shared.values()), None)
    if gid is None or not m.shared:
        return None
    g = plan.groups.get(gid)
    return gid if g is not None and len(g.members) > 1 else None


def plan_bars(plan: AdaptationPlan, history: Sequence | None = None) -> dict[str, list[PlanBar]]:
    """Per module type (plan order), its modules by layer with the rank each trained with.

    ``history``: FlexLoRA's ``[[step, {module: rank}]]``; its last entry gives the final ranks
    of the modules it lists (the rank exported), and the plan's rank becomes ``initial``.
    """
    final = final_ranks(history)
    by_type: dict[str, list[PlanBar]] = {}
    for name, m in plan.modules.items():
        effective = m.rank * m.blocks
        bar = PlanBar(name, m.layer, effective, m.blocks, m.rank, _shared_group(plan, name))
        if name in final:
            bar = PlanBar(name, m.layer, final[name], 1, final[name], bar.group, effective)
        by_type.setdefault(m.module_type, []).append(bar)
    return {t: sorted(bars, key=lambda b: b.layer) for t, bars in by_type.items()}


def trained_params(plan: AdaptationPlan, history: Sequence | None = None) -> int:
    """The plan's trainable parameters, FlexLoRA modules counted at their final ranks."""
    final = final_ranks(history)
    total = plan.num_trainable_params()
    for name, r in final.items():
        m = plan.modules.get(name)
        if m is not None and m.kind == "flex":  # P (d_out, r), λ (r), Q (r, d_in)
            total += (r - m.rank) * (m.d_out + m.d_in + 1)
    return total


def _legend_handles(bars: Mapping[str, list[PlanBar]]) -> list[Any]:
    from matplotlib.patches import Patch

    flat = [b for bs in bars.values() for b in bs]
    handles = [Patch(facecolor=OWN, edgecolor="black", label="own adapter (nothing shared)")]
    if any(b.group for b in flat):
        handles.append(
            Patch(
                facecolor="tab:orange",
                edgecolor="black",
                label="shared group: one colour per group of layers sharing factors",
            )  # fmt: skip
        )
    if any(b.initial is not None for b in flat):
        handles.append(
            Patch(
                facecolor="grey",
                alpha=INITIAL_ALPHA,
                edgecolor="black",
                label="initial rank (FlexLoRA), beside the final one",
            )  # fmt: skip
        )
    if any(b.blocks > 1 for b in flat):
        handles.append(Patch(facecolor="none", edgecolor="none",
                             label="n×r above a bar: n diagonal blocks of rank r"))  # fmt: skip
    return handles


# shared groups: tab10 without its blue (OWN) and grey (FlexLoRA's initial ranks)
GROUP_COLOURS = tuple(f"C{i}" for i in (1, 2, 3, 4, 5, 6, 8, 9))


def _colours(bars: Sequence[PlanBar]) -> list[str]:
    groups = list(dict.fromkeys(b.group for b in bars if b.group is not None))
    return [
        OWN if b.group is None else GROUP_COLOURS[groups.index(b.group) % len(GROUP_COLOURS)]
        for b in bars
    ]


def _panel(ax: Any, mtype: str, bars: list[PlanBar]) -> None:
    from .figures import short_type

    xs = list(range(len(bars)))
    flex = any(b.initial is not None for b in bars)
    width = 0.4 if flex else 0.8
    shift = width / 2 if flex else 0.0
    ax.bar(
        [x + shift for x in xs],
        [b.rank for b in bars],
        width=width,
        color=_colours(bars),
        edgecolor="black",
        linewidth=0.5,
        label="trained",
    )
    if flex:
        ax.bar([x - shift for x in xs], [b.initial or 0 for b in bars], width=width,
               color="grey", alpha=INITIAL_ALPHA, edgecolor="black", linewidth=0.5,
               label="initial")  # fmt: skip
    for x, b in zip(xs, bars):
        if b.blocks > 1:
            ax.text(x + shift, b.rank, f"{b.blocks}×{b.block_rank}", ha="center", va="bottom",
                    fontsize=7)  # fmt: skip
    ax.set_xticks(xs, [str(b.layer) for b in bars])
    ax.set_xlabel("layer")
    ax.set_ylabel("effective rank")
    shared = len({b.group for b in bars if b.group})
    note = f", {shared} shared group{'s' * (shared != 1)}" if shared else ""
    ax.set_title(f"{short_type(mtype)}{note}", fontsize=10)
    top = max(max(b.rank, b.initial or 0) for b in bars)
    ax.set_ylim(0, top * 1.25 + 0.5)
    ax.grid(axis="y", alpha=0.3)


def plan_figure(
    plan: AdaptationPlan, history: Sequence | None = None, title: str | None = None
) -> tuple[Any, dict[str, list[PlanBar]]]:
    """``(matplotlib figure, the bars drawn)``: one panel per module type, in ``plan_bars``
    order; each panel's first bar container holds the trained ranks, the second (FlexLoRA) the
    initial ones."""
    plt = pyplot()
    bars = plan_bars(plan, history)
    widest = max(len(v) for v in bars.values())
    fig, axes = plt.subplots(
        len(bars), 1, squeeze=False, figsize=(max(6, 0.45 * widest + 3), 2.4 * len(bars) + 1.4)
    )
    for ax, (mtype, type_bars) in zip(axes[:, 0], bars.items()):
        _panel(ax, mtype, type_bars)
    flex = any(b.initial is not None for bs in bars.values() for b in bs)
    what = "final rank per module" if flex else "rank per module"
    height = ("height = final active rank (FlexLoRA), initial rank faint beside it" if flex
              else "height = effective rank trained (blocks × block rank)")  # fmt: skip
    head = f"{title}: " if title else f"{plan.method}: "
    fig.suptitle(
        f"{head}{what} ({trained_params(plan, history):,} adapter params)\n{height}", fontsize=10
    )
    handles = _legend_handles(bars)
    fig.legend(handles=handles, loc="lower center", ncol=min(2, len(handles)), fontsize=8,
               frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0.03 + 0.03 * ((len(handles) + 1) // 2), 1, 1))
    return fig, bars


def plot_plan(
    plan: AdaptationPlan,
    path: str | os.PathLike,
    history: Sequence | None = None,
    title: str | None = None,
) -> Path:
    """Write the plan figure (see the module docstring) as a PNG; returns the path."""
    fig, _ = plan_figure(plan, history, title)
    return save_png(fig, path, tight=False)  # plan_figure laid it out around its legend

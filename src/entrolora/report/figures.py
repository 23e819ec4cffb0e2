"""The report's figures (PNG, matplotlib Agg, imported lazily) and the helpers every figure
shares: the statistics (similarity and entropy, effective rank), where an ``auto`` budget went,
accuracy against parameters, FlexLoRA's rank evolution. The plan figure is ``plan_figure``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files import pyplot, save_png
from ..plans import AdaptationPlan
from ..stats import GradientStats


def short_type(module_type: str) -> str:
    """Readable module type: the part after the layer wildcard (``attention.self.query``)."""
    tail = module_type.split("*.", 1)[-1]
    for prefix in ("self_attn.", "attention.self.", "attn."):
        if tail.startswith(prefix):
            return tail[len(prefix) :]
    return tail


def _layer_ticks(ax: Any, layers: Sequence[int], axis: str = "x") -> None:
    step = max(1, len(layers) // 16)
    pos = list(range(0, len(layers), step))
    labels = [str(layers[i]) for i in pos]
    if axis == "x":
        ax.set_xticks(pos, labels)
    else:
        ax.set_yticks(pos, labels)


# -- statistics ---------------------------------------------------------------------------------
def plot_similarity_entropy(
    stats: GradientStats, path: str | os.PathLike, kind: str = "rmi"
) -> Path:
    """One row per module type: similarity heatmap (layer × layer) and entropy bars per layer."""
    plt = pyplot()
    types = stats.types
    fig, axes = plt.subplots(
        len(types),
        2,
        figsize=(10, 3.6 * len(types)),
        squeeze=False,
        gridspec_kw={"width_ratios": [1, 1.3]},
    )
    for row, (mtype, names) in enumerate(types.items()):
        mods = [stats[n] for n in names]
        layers = [m.layer for m in mods]
        sim = stats.similarity(mtype, kind=kind).numpy()
        ax = axes[row][0]
        im = ax.imshow(sim, cmap="magma", interpolation="nearest")
        ax.set_title(f"{short_type(mtype)}: gradient similarity ({kind.upper()})")
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        _layer_ticks(ax, layers, "x")
        _layer_ticks(ax, layers, "y")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=kind.upper())
        ax = axes[row][1]
        ent = [m.entropy for m in mods]
        finite = [e for e in ent if e is not None]
        # entropies are usually all negative: draw bars up from just below the smallest one
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
        pad = max(0.05, 0.15 * (hi - lo))
        base = lo - pad
        heights = [0.0 if e is None else e - base for e in ent]
        ax.bar(range(len(layers)), heights, bottom=base, color="tab:blue")
        for x, e in enumerate(ent):
            if e is None:
                ax.text(x, base, "no grad", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_ylim(base, hi + pad)
        ax.set_title(f"{short_type(mtype)}: proxy entropy per layer")
        ax.set_xlabel("layer")
        ax.set_ylabel("entropy (nats)")
        _layer_ticks(ax, layers, "x")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Gradient similarity and entropy by layer (E²LoRA Fig. 1)", fontsize=12)
    return save_png(fig, path)


def plot_erank(stats: GradientStats, path: str | os.PathLike) -> Path:
    """Heatmap of gradient effective rank, module type (rows) × layer (columns), values written."""
    plt = pyplot()
    import numpy as np

    types = stats.types
    layers = sorted({stats[n].layer for names in types.values() for n in names})
    col = {layer: j for j, layer in enumerate(layers)}
    grid = np.full((len(types), len(layers)), np.nan)
    for i, names in enumerate(types.values()):
        for n in names:
            e = stats[n].erank
            grid[i, col[stats[n].layer]] = np.nan if e is None else e
    fig, ax = plt.subplots(
        figsize=(max(8, 0.6 * len(layers) + 3), max(2.5, 0.6 * len(types) + 1.5))
    )
    im = ax.imshow(grid, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(types)), [short_type(t) for t in types])
    _layer_ticks(ax, layers, "x")
    ax.set_xlabel("layer")
    ax.set_ylabel("module type")
    ax.set_title("Gradient effective rank (GID) by layer × module type (RaLoRA Fig. 3)")
    if grid.size <= 400:
        finite = grid[np.isfinite(grid)]
        mid = float(finite.mean()) if finite.size else 0.0
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if np.isfinite(grid[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{grid[i, j]:.1f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if grid[i, j] < mid else "black",
                    )
    fig.colorbar(im, ax=ax, label="effective rank")
    return save_png(fig, path)


def plot_budget(
    plan: AdaptationPlan, path: str | os.PathLike, stats: GradientStats | None = None
) -> Path:
    """Heatmap of an auto plan (METHODS.md §7): module type (rows) × layer (columns), colour =
    rank bought, each cell annotated with the rank and the marginal value ``s^p`` of its last
    unit. ``stats``: the probe's statistics, whose modules the plan left at rank 0 show as 0
    (without them only the adapted modules' types and layers appear)."""
    plt = pyplot()
    import numpy as np

    marginal = plan.options.get("marginal") or {}
    cells = {n: (m.module_type, m.layer) for n, m in plan.modules.items()}
    if stats is not None:
        cells.update({n: (stats[n].module_type, stats[n].layer) for n in stats})
    types = sorted({t for t, _ in cells.values()})
    layers = sorted({layer for _, layer in cells.values()})
    row, col = {t: i for i, t in enumerate(types)}, {x: j for j, x in enumerate(layers)}
    grid = np.full((len(types), len(layers)), np.nan)
    for n, (t, layer) in cells.items():
        grid[row[t], col[layer]] = plan.modules[n].rank if n in plan.modules else 0
    fig, ax = plt.subplots(
        figsize=(max(8, 0.75 * len(layers) + 3), max(2.5, 0.65 * len(types) + 1.8))
    )
    im = ax.imshow(grid, cmap="Blues", aspect="auto", interpolation="nearest", vmin=0)
    ax.set_yticks(range(len(types)), [short_type(t) for t in types])
    _layer_ticks(ax, layers, "x")
    ax.set_xlabel("layer")
    ax.set_ylabel("module type")
    if grid.size <= 400:
        top = float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0
        for n, (t, layer) in cells.items():
            i, j = row[t], col[layer]
            text = f"{int(grid[i, j])}"
            if n in marginal and grid.size <= 120:
                text += f"\n{marginal[n]:.1e}"
            color = "white" if grid[i, j] > 0.6 * top else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=6.5, color=color)
    o = plan.options
    spent, budget = o.get("spent", plan.num_trainable_params()), o.get("budget")
    spend = f"{spent:,} of {budget:,} parameters" if budget else f"{spent:,} parameters"
    ax.set_title(
        f"{plan.method}: ranks bought ({spend}, power {o.get('power', '?')}); cell: rank and "
        "marginal value of its last unit",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, label="rank")
    return save_png(fig, path)


# -- runs ---------------------------------------------------------------------------------------
def plot_accuracy_vs_params(runs: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Scatter of accuracy (%) against trainable parameters (log scale), one labelled point a run.

    Each run is a metrics mapping with ``method``, ``accuracy`` and ``trainable_params``.
    """
    plt = pyplot()
    pts = [r for r in runs if r.get("accuracy") is not None and r.get("trainable_params")]
    if not pts:
        raise ValueError("no run has both accuracy and trainable_params; train a classifier first")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(pts):
        ax.scatter(r["trainable_params"], 100 * r["accuracy"], s=60, color=f"C{i % 10}", zorder=3)
        ax.annotate(
            str(r.get("method", f"run {i}")),
            (r["trainable_params"], 100 * r["accuracy"]),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=9,
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Accuracy vs trainable parameters")
    ax.grid(alpha=0.3, which="both")
    ys = [100 * r["accuracy"] for r in pts]
    pad = max(1.0, 0.2 * (max(ys) - min(ys)))
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    return save_png(fig, path)


def plot_rank_evolution(history: Sequence, path: str | os.PathLike) -> Path:
    """FlexLoRA rank evolution, drawn by ``entrolora.flex.plot_rank_evolution``."""
    from ..flex import plot_rank_evolution as draw

    return draw(history, path)

"""Plots and the HTML report: statistics, plans, FlexLoRA rank evolution, runs compared.

Figures (PNG, matplotlib Agg, imported lazily):

- ``similarity_entropy.png``: per module type, the RMI similarity heatmap (METHODS.md §2 eq. 3)
  next to per-layer proxy entropy bars (eq. 1) — E²LoRA Figure 1;
- ``erank.png``: gradient effective rank (RaLoRA eq. 3), layer × module type — RaLoRA Figure 3;
- ``plan.png``: rank per layer and module type, coloured by shared group, block count marked;
- ``rank_evolution.png``: FlexLoRA active ranks over training (``entrolora.flex``);
- ``accuracy_vs_params.png``: accuracy against trainable parameters for several runs.

``write_report`` writes the figures it has data for and a ``report.html`` that shows them with
the metrics table and the plan summary.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import atomic_write, atomic_write_text
from .plans import AdaptationPlan
from .reading import read_json
from .stats import GradientStats

HISTORY_FILE = "flex_history.json"


def short_type(module_type: str) -> str:
    """Readable module type: the part after the layer wildcard (``attention.self.query``)."""
    tail = module_type.split("*.", 1)[-1]
    for prefix in ("self_attn.", "attention.self.", "attn."):
        if tail.startswith(prefix):
            return tail[len(prefix) :]
    return tail


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> Path:
    plt = _plt()
    try:
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return Path(path)


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
    plt = _plt()
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
    return _save(fig, path)


def plot_erank(stats: GradientStats, path: str | os.PathLike) -> Path:
    """Heatmap of gradient effective rank, module type (rows) × layer (columns), values written."""
    plt = _plt()
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
    return _save(fig, path)


# -- plans --------------------------------------------------------------------------------------
def plot_plan(plan: AdaptationPlan, path: str | os.PathLike) -> Path:
    """Rank per layer for each module type; bar colour = shared group, ``×n`` = block count."""
    plt = _plt()
    by_type: dict[str, list] = {}
    for m in plan.modules.values():
        by_type.setdefault(m.module_type, []).append(m)
    fig, axes = plt.subplots(
        len(by_type),
        1,
        figsize=(
            max(6, 0.45 * max(len(v) for v in by_type.values()) + 3),
            2.4 * len(by_type) + 0.6,
        ),
        squeeze=False,
    )
    cmap = plt.get_cmap("tab20")
    for ax, (mtype, mods) in zip(axes[:, 0], by_type.items()):
        mods = sorted(mods, key=lambda m: m.layer)
        groups = list(dict.fromkeys(m.group for m in mods if m.group is not None))
        colors = [
            cmap(groups.index(m.group) % 20) if m.group is not None else "tab:blue" for m in mods
        ]
        xs = range(len(mods))
        ax.bar(xs, [m.rank for m in mods], color=colors, edgecolor="black", linewidth=0.5)
        for x, m in zip(xs, mods):
            if m.blocks > 1:
                ax.text(x, m.rank, f"×{m.blocks}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(xs), [str(m.layer) for m in mods])
        ax.set_xlabel("layer")
        ax.set_ylabel("rank")
        note = f", {len(groups)} shared groups (colour)" if groups else ""
        ax.set_title(f"{short_type(mtype)}{note}", fontsize=10)
        ax.set_ylim(0, max(m.rank for m in mods) * 1.25 + 0.5)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"{plan.method}: rank per layer ({plan.num_trainable_params():,} adapter params)\n"
        "bar colour = shared group, ×n = block-diagonal blocks",
        fontsize=10,
    )
    return _save(fig, path)


# -- runs ---------------------------------------------------------------------------------------
def plot_accuracy_vs_params(runs: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Scatter of accuracy (%) against trainable parameters (log scale), one labelled point a run.

    Each run is a metrics mapping with ``method``, ``accuracy`` and ``trainable_params``.
    """
    plt = _plt()
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
    return _save(fig, path)


def plot_rank_evolution(history: Sequence, path: str | os.PathLike) -> Path:
    """FlexLoRA rank evolution, drawn by ``entrolora.flex.plot_rank_evolution``."""
    from .flex import plot_rank_evolution as draw

    return draw(history, path)


# -- loading what a report shows ----------------------------------------------------------------
@dataclass
class ReportInputs:
    """What one report shows; every part optional."""

    stats: GradientStats | None = None
    plan: AdaptationPlan | None = None
    metrics: dict | None = None
    history: list | None = None
    runs: list[dict] = field(default_factory=list)


def load_run(folder: str | os.PathLike) -> ReportInputs:
    """Read a run folder written by ``entrolora train`` (metrics, stats, plan, FlexLoRA history)."""
    folder = Path(folder)
    if not (folder / "metrics.json").is_file():
        raise ValueError(
            f"{str(folder)!r} is not a run folder (no metrics.json); pass a folder written by "
            "`entrolora train`, a stats .safetensors file or a plan .json file"
        )
    again = "train the run again"
    out = ReportInputs(metrics=read_json(folder / "metrics.json", "run metrics", again))
    if (folder / "stats.safetensors").is_file():
        out.stats = GradientStats.load(folder / "stats.safetensors")
    if (folder / "plan.json").is_file():
        out.plan = AdaptationPlan.load(folder / "plan.json")
    if (folder / HISTORY_FILE).is_file():
        out.history = read_json(folder / HISTORY_FILE, "FlexLoRA history", again, kind=list)
    return out


def gather(paths: Sequence[str | os.PathLike]) -> ReportInputs:
    """Combine stats files, plan files and run folders; several runs → a comparison."""
    if not paths:
        raise ValueError("nothing to report: pass a stats file, a plan file or run folder(s)")
    out = ReportInputs()
    for p in map(Path, paths):
        if p.is_dir():
            run = load_run(p)
            out.runs.append(run.metrics)
            for name in ("stats", "plan", "history", "metrics"):
                if getattr(out, name) is None:
                    setattr(out, name, getattr(run, name))
        elif not p.exists():
            raise FileNotFoundError(f"{str(p)!r} does not exist")
        elif p.suffix == ".safetensors":
            out.stats = GradientStats.load(p)
        elif p.suffix == ".json":
            out.plan = AdaptationPlan.load(p)
        else:
            raise ValueError(
                f"cannot report on {p.name!r}: expected a .safetensors statistics file, a plan "
                ".json or a run folder"
            )
    if len(out.runs) > 1:
        out.metrics = None  # a comparison: the table lists every run instead
    return out


# -- HTML ---------------------------------------------------------------------------------------
def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, int):
            return f"{v:,}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


RUN_COLUMNS = ("method", "accuracy", "eval_loss", "trainable_params", "train_s", "total_s")


def write_report(
    out_dir: str | os.PathLike, inputs: ReportInputs, title: str = "entrolora report"
) -> Path:
    """Write the figures ``inputs`` allow and ``report.html`` into ``out_dir``; returns the HTML."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str]] = []
    if inputs.stats is not None and len(inputs.stats):
        plot_similarity_entropy(inputs.stats, out_dir / "similarity_entropy.png")
        figures.append(("similarity_entropy.png", "Gradient similarity and entropy per layer"))
        if any(inputs.stats[n].erank is not None for n in inputs.stats):
            plot_erank(inputs.stats, out_dir / "erank.png")
            figures.append(("erank.png", "Gradient effective rank"))
    if inputs.plan is not None:
        plot_plan(inputs.plan, out_dir / "plan.png")
        figures.append(("plan.png", "Rank / group / block allocation"))
    if inputs.history:
        plot_rank_evolution(inputs.history, out_dir / "rank_evolution.png")
        figures.append(("rank_evolution.png", "FlexLoRA rank evolution"))
    runs = [r for r in inputs.runs if r]
    if len(runs) > 1 and any(r.get("accuracy") is not None for r in runs):
        plot_accuracy_vs_params(runs, out_dir / "accuracy_vs_params.png")
        figures.append(("accuracy_vs_params.png", "Accuracy vs trainable parameters"))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em;"
        "max-width:1100px}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right}img{max-width:100%;border:1px solid #eee}"
        "pre{background:#f6f6f6;padding:8px;overflow-x:auto}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if len(runs) > 1:
        parts += ["<h2>Runs</h2>", _table(runs, RUN_COLUMNS)]
    if inputs.metrics:
        flat = {k: v for k, v in inputs.metrics.items() if not isinstance(v, (dict, list))}
        parts += [
            "<h2>Metrics</h2>",
            _table([{"metric": k, "value": v} for k, v in flat.items()], ("metric", "value")),
        ]
        by_cat = inputs.metrics.get("by_category")  # --task sft: scores per category
        if by_cat:
            rows = [{"category": c, **s} for c, s in by_cat.items()]
            cols = ("category", "exact_match", "eval_loss", "eval_examples")
            parts += ["<h2>Exact match by category</h2>", _table(rows, cols)]
    if inputs.plan is not None:
        parts += ["<h2>Plan</h2>", f"<pre>{html.escape(inputs.plan.summary())}</pre>"]
    for name, caption in figures:
        parts += [f"<h2>{html.escape(caption)}</h2>", f"<img src='{name}' alt='{caption}'>"]
    if not figures and not inputs.metrics and len(runs) < 2:
        raise ValueError("nothing to report: the inputs hold no statistics, plan or metrics")
    parts.append("</body></html>")
    return atomic_write_text(out_dir / "report.html", "\n".join(parts) + "\n")

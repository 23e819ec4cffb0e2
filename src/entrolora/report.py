"""Plots and the HTML report: statistics, plans, FlexLoRA rank evolution, runs compared.

Figures (PNG, matplotlib Agg, imported lazily):

- ``similarity_entropy.png``: per module type, the RMI similarity heatmap (METHODS.md §2 eq. 3)
  next to per-layer proxy entropy bars (eq. 1) — E²LoRA Figure 1;
- ``erank.png``: gradient effective rank (RaLoRA eq. 3), layer × module type — RaLoRA Figure 3;
- ``plan.png``: the effective rank each module trained with, per layer and module type
  (``plan_figure``: blocks × block rank, FlexLoRA's final ranks, shared groups coloured);
- ``rank_evolution.png``: FlexLoRA active ranks over training (``entrolora.flex``);
- ``accuracy_vs_params.png``: accuracy against trainable parameters for several runs.

``write_report`` writes the figures it has data for and a ``report.html`` that shows them with
the metrics table and the plan summary; for several runs, side by side: the table, each run's
plan titled with the run, links to each run's own report.html.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import atomic_write, atomic_write_text
from .plan_figure import plot_plan
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
class RunReport:
    """One run folder of a report: its label (the folder's name), where it is, what it trained."""

    label: str
    folder: Path
    metrics: dict
    plan: AdaptationPlan | None = None
    history: list | None = None
    stats: GradientStats | None = None


@dataclass
class ReportInputs:
    """What one report shows; every part optional. ``folders``: the run folders compared (each
    with its own plan figure and a link to its report); ``label``: the one run's name, shown in
    the plan figure's title; ``stats_of``: the run the statistics come from."""

    stats: GradientStats | None = None
    plan: AdaptationPlan | None = None
    metrics: dict | None = None
    history: list | None = None
    runs: list[dict] = field(default_factory=list)
    folders: list[RunReport] = field(default_factory=list)
    label: str | None = None
    stats_of: str | None = None  # the run whose statistics these are, in a comparison


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


def _labelled(folders: Sequence[Path]) -> list[str]:
    """Each folder's name, or its whole path where two folders share a name."""
    names = [f.resolve().name or str(f) for f in folders]
    return [n if names.count(n) == 1 else str(f) for n, f in zip(names, folders)]


def _demo_runs(path: Path) -> list[Path]:
    """A demo folder (it holds ``demo.json``, no ``metrics.json``) stands for its run folders."""
    if not (path / "demo.json").is_file() or (path / "metrics.json").is_file():
        return [path]
    record = read_json(path / "demo.json", "demo record", "run the demo again")
    runs = record.get("runs") or {m: m for m in record.get("methods", [])}
    return [path / folder for folder in runs.values()]


def gather(paths: Sequence[str | os.PathLike]) -> ReportInputs:
    """Combine stats files, plan files and run folders (a demo folder: its runs); several runs →
    a comparison, each run with its own plan (and FlexLoRA history) in ``folders``."""
    if not paths:
        raise ValueError("nothing to report: pass a stats file, a plan file or run folder(s)")
    out = ReportInputs()
    dirs: list[Path] = []
    loaded: list[ReportInputs] = []
    for p in [q for path in paths for q in _demo_runs(Path(path))]:
        if p.is_dir():
            dirs.append(p)
            loaded.append(load_run(p))
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
    out.folders = [RunReport(label, d, r.metrics, r.plan, r.history, r.stats)
                   for label, d, r in zip(_labelled(dirs), dirs, loaded)]  # fmt: skip
    out.runs = [r.metrics for r in loaded]
    if out.stats is None:
        probed = [(f.label, f.stats) for f in out.folders if f.stats is not None]
        out.stats_of, out.stats = probed[0] if probed else (None, None)
    if len(loaded) == 1:
        one = loaded[0]
        out.label, out.metrics, out.history = out.folders[0].label, one.metrics, one.history
        out.plan = out.plan or one.plan
    return out


# -- HTML ---------------------------------------------------------------------------------------
def _table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], raw: Sequence[str] = ()
) -> str:
    """An HTML table; the ``raw`` columns hold HTML already (links), the rest is escaped."""

    def fmt(c: str, v: Any) -> str:
        if c in raw:
            return str(v)
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, int):
            return f"{v:,}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{fmt(c, r.get(c, ''))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


RUN_COLUMNS = ("run", "method", "accuracy", "eval_loss", "trainable_params", "train_s", "total_s")
STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "img{max-width:100%;border:1px solid #eee}pre{background:#f6f6f6;padding:8px;"
    "overflow-x:auto}.runs{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));"
    "gap:1em}figure{margin:0}figcaption{font-weight:bold;margin-bottom:4px}"
)


def _run_link(run: RunReport, link_from: Path) -> str:
    """The run's label, linked to its own report.html when it has one."""
    label = html.escape(run.label)
    page = run.folder / "report.html"
    if not page.is_file():
        return label
    href = Path(os.path.relpath(page.resolve(), link_from.resolve())).as_posix()
    return f"<a href='{html.escape(href, quote=True)}'>{label}</a>"


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _compare_runs(out_dir: Path, runs: Sequence[RunReport], link_from: Path) -> list[str]:
    """The runs side by side: the table (run names linking to their reports), each run's plan
    figure titled with the run, and FlexLoRA runs' rank evolution."""
    links = [_run_link(r, link_from) for r in runs]
    rows = [{**r.metrics, "run": link} for r, link in zip(runs, links)]
    parts = ["<h2>Runs</h2>", _table(rows, RUN_COLUMNS, raw=("run",))]
    cells = []
    for i, (run, link) in enumerate(zip(runs, links)):
        if run.plan is None:
            continue
        method = str(run.metrics.get("method") or run.plan.method)
        same = run.label == method
        name = f"plan-{i + 1}-{_safe(run.label)}.png"
        plot_plan(run.plan, out_dir / name, run.history,
                  title=run.label if same else f"{run.label} ({method})")  # fmt: skip
        caption = link if same else f"{link} ({html.escape(method)})"
        cells.append(_figure(name, caption, run.label))
        if run.history:
            name = f"rank_evolution-{i + 1}-{_safe(run.label)}.png"
            plot_rank_evolution(run.history, out_dir / name)
            cells.append(_figure(name, f"{link}: FlexLoRA rank evolution", run.label))
    if cells:
        parts += ["<h2>Plans: effective rank trained, per run</h2>", "<div class='runs'>"]
        parts += cells + ["</div>"]
    return parts


def _figure(src: str, caption_html: str, alt: str) -> str:
    alt = html.escape(alt, quote=True)
    return f"<figure><figcaption>{caption_html}</figcaption><img src='{src}' alt='{alt}'></figure>"


def write_report(
    out_dir: str | os.PathLike,
    inputs: ReportInputs,
    title: str = "entrolora report",
    link_from: str | os.PathLike | None = None,
) -> Path:
    """Write the figures ``inputs`` allow and ``report.html`` into ``out_dir``; returns the HTML.

    Several run folders (``inputs.folders``) are compared side by side, each run's plan titled
    with its name and linked to its own report.html, relative to ``link_from`` (the folder the
    report ends up in, when ``out_dir`` is a staging folder; default ``out_dir``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    link_from = Path(link_from) if link_from is not None else out_dir
    compare = len(inputs.folders) > 1
    figures: list[tuple[str, str]] = []
    if inputs.stats is not None and len(inputs.stats):
        which = f" (statistics of {inputs.stats_of})" if compare and inputs.stats_of else ""
        plot_similarity_entropy(inputs.stats, out_dir / "similarity_entropy.png")
        figures.append(("similarity_entropy.png", "Gradient similarity and entropy per layer"
                        + which))  # fmt: skip
        if any(inputs.stats[n].erank is not None for n in inputs.stats):
            plot_erank(inputs.stats, out_dir / "erank.png")
            figures.append(("erank.png", "Gradient effective rank" + which))
    if inputs.plan is not None:
        plot_plan(inputs.plan, out_dir / "plan.png", inputs.history, title=inputs.label)
        figures.append(("plan.png", "Effective rank trained per module"))
    if inputs.history and not compare:
        plot_rank_evolution(inputs.history, out_dir / "rank_evolution.png")
        figures.append(("rank_evolution.png", "FlexLoRA rank evolution"))
    runs = [r for r in inputs.runs if r]
    if len(runs) > 1 and any(r.get("accuracy") is not None for r in runs):
        plot_accuracy_vs_params(runs, out_dir / "accuracy_vs_params.png")
        figures.insert(0, ("accuracy_vs_params.png", "Accuracy vs trainable parameters"))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if compare:
        parts += _compare_runs(out_dir, inputs.folders, link_from)
    elif len(runs) > 1:
        parts += ["<h2>Runs</h2>", _table(runs, RUN_COLUMNS)]
    if inputs.metrics and not compare:
        flat = {k: v for k, v in inputs.metrics.items() if not isinstance(v, (dict, list))}
        parts += [
            "<h2>Metrics</h2>",
            _table([{"metric": k, "value": v} for k, v in flat.items()], ("metric", "value")),
        ]
    if inputs.plan is not None:
        parts += ["<h2>Plan</h2>", f"<pre>{html.escape(inputs.plan.summary())}</pre>"]
    for name, caption in figures:
        parts += [f"<h2>{html.escape(caption)}</h2>",
                  f"<img src='{name}' alt='{html.escape(caption, quote=True)}'>"]  # fmt: skip
    if not figures and not inputs.metrics and len(runs) < 2:
        raise ValueError("nothing to report: the inputs hold no statistics, plan or metrics")
    parts.append("</body></html>")
    return atomic_write_text(out_dir / "report.html", "\n".join(parts) + "\n")

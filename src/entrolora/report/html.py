"""Plots and the HTML report: statistics, plans, FlexLoRA rank evolution, runs compared.

Figures (PNG, matplotlib Agg, imported lazily):

- ``similarity_entropy.png``: per module type, the RMI similarity heatmap (METHODS.md §2 eq. 3)
  next to per-layer proxy entropy bars (eq. 1) — E²LoRA Figure 1;
- ``erank.png``: gradient effective rank (RaLoRA eq. 3), layer × module type — RaLoRA Figure 3;
- ``plan.png``: the effective rank each module trained with, per layer and module type
  (``plan_figure``: blocks × block rank, FlexLoRA's final ranks, shared groups coloured);
- ``budget.png``: where an ``auto`` plan's budget went (METHODS.md §7): rank bought, module type
  × layer, each cell annotated with its rank and the marginal value of its last unit;
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

from ..data.reading import read_json
from ..files import atomic_write_text
from ..plans import AdaptationPlan
from ..stats import GradientStats
from .figures import (
    plot_accuracy_vs_params,
    plot_budget,
    plot_erank,
    plot_rank_evolution,
    plot_similarity_entropy,
)
from .plan_figure import plot_plan

HISTORY_FILE = "flex_history.json"


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


def _candidates(inputs: ReportInputs) -> GradientStats | None:
    """The statistics when they hold every module of the plan (its probe), else None."""
    stats, plan = inputs.stats, inputs.plan
    if stats is None or plan is None or not all(n in stats for n in plan.modules):
        return None
    return stats


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
    from ..guards.output import guard_folder

    out_dir = guard_folder(out_dir, "write_report", "report")  # never into a published run
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
        if inputs.plan.options.get("marginal"):  # auto: where the budget went (METHODS.md §7)
            plot_budget(inputs.plan, out_dir / "budget.png", _candidates(inputs))
            figures.append(("budget.png", "Where the parameter budget went (auto)"))
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
        by_cat = inputs.metrics.get("by_category")  # --task sft: scores per category
        if by_cat:
            rows = [{"category": c, **s} for c, s in by_cat.items()]
            cols = ("category", "exact_match", "eval_loss", "eval_examples")
            parts += ["<h2>Exact match by category</h2>", _table(rows, cols)]
    if inputs.plan is not None:
        parts += ["<h2>Plan</h2>", f"<pre>{html.escape(inputs.plan.summary())}</pre>"]
    for name, caption in figures:
        parts += [f"<h2>{html.escape(caption)}</h2>",
                  f"<img src='{name}' alt='{html.escape(caption, quote=True)}'>"]  # fmt: skip
    if not figures and not inputs.metrics and len(runs) < 2:
        raise ValueError("nothing to report: the inputs hold no statistics, plan or metrics")
    parts.append("</body></html>")
    return atomic_write_text(out_dir / "report.html", "\n".join(parts) + "\n")

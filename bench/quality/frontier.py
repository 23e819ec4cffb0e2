"""The capacity frontier (issue 31) from ``bench/quality/quality.py``'s runs.csv: uniform LoRA's
score against its trainable parameters at every rank, and each contender's distance to it.

The frontier of a seed is LoRA's score at ranks 1, 2, 4, … on that seed; a contender's distance
on a seed is its score minus the frontier's at the contender's own parameter count, linearly
interpolated in log(parameters) between the two LoRA ranks around it (same seed: the data
split is shared, so the difference is paired). The table gives the mean distance over seeds ±
its standard error (sample SD of the per-seed distances / √n). A contender outside the
frontier's range of parameters has no distance (it is not extrapolated).

Under the tables ``answers`` puts the issue's three questions in words, per budget and metric:
which planner is above the frontier by more than 2 SE, which peft peer is nearest it, and each
planner against the truncation control (paired on the seeds both finished).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quality_lr import chosen_lr, select_accuracies, test_rows
from quality_run import PROBE_FREE
from quality_summary import row_params, verdict

import common
from entrolora.files import atomic_write_text, pyplot, save_png

Row = Mapping[str, str]


@dataclass(frozen=True)
class Metric:
    """A score of runs.csv: its column, its name in tables, its scale and which way is better."""

    column: str
    name: str
    scale: float = 100.0  # accuracy and exact match in percent
    higher_is_better: bool = True
    unit: str = "pp"


ACCURACY = Metric("accuracy", "accuracy %")
EXACT_MATCH = Metric("accuracy", "exact match %")  # --task sft reports exact match as accuracy
ANSWER_LOSS = Metric("eval_loss", "answer loss", 1.0, False, "nats")


def metrics_for(task: str) -> tuple[Metric, ...]:
    """The frontier's metrics: accuracy (classify); exact match, then answer loss (sft)."""
    return (EXACT_MATCH, ANSWER_LOSS) if task == "sft" else (ACCURACY,)


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """The value at ``x`` parameters on the line through ``(parameters, value)`` points, linear in
    log(parameters) between the two nearest points around ``x``; None outside their range."""
    pts = sorted(points)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return y0
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return pts[0][1]  # a single point, hit exactly


def by_seed(rows: Sequence[Row], cell: str, metric: Metric) -> dict[int, tuple[int, float]]:
    """``{seed: (trainable parameters, score)}`` of ``cell``'s test runs."""
    return {
        int(r["seed"]): (row_params(r), metric.scale * float(r[metric.column]))
        for r in test_rows(rows)
        if r["cell"] == cell and r.get(metric.column) not in (None, "")
    }


def frontier_by_seed(
    rows: Sequence[Row], lora_cells: Sequence[str], metric: Metric
) -> dict[int, list[tuple[float, float]]]:
    """``{seed: [(parameters, score) of each LoRA rank finished on that seed]}``."""
    out: dict[int, list[tuple[float, float]]] = {}
    for cell in lora_cells:
        for seed, (params, value) in by_seed(rows, cell, metric).items():
            out.setdefault(seed, []).append((float(params), value))
    return out


def distance(
    rows: Sequence[Row], cell: str, lora_cells: Sequence[str], metric: Metric
) -> dict[str, Any]:
    """A contender's paired distance to the frontier: per seed its score − the frontier's at its
    own parameter count (``interpolate``); ``mean``, ``se`` (None with one seed), ``n``,
    ``seeds``, mean ``params``, and ``outside`` (seeds whose count the frontier does not span).
    """
    front = frontier_by_seed(rows, lora_cells, metric)
    diffs, params, outside = {}, [], []
    for seed, (p, value) in sorted(by_seed(rows, cell, metric).items()):
        ref = interpolate(front.get(seed, []), float(p))
        if ref is None:
            outside.append(seed)
            continue
        diffs[seed] = value - ref
        params.append(p)
    n = len(diffs)
    mean, se = _mean_se(list(diffs.values()))
    return {
        "mean": mean,
        "se": se,
        "n": n,
        "seeds": sorted(diffs),
        "params": sum(params) / n if n else None,
        "outside": outside,
    }


def _mean_se(diffs: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and standard error (sample SD / √n) of paired per-seed differences; None for what
    too few of them cannot give (no mean without one, no SE without two)."""
    if not diffs:
        return None, None
    mean, sd = common.mean_std(diffs)
    return mean, sd / math.sqrt(len(diffs)) if len(diffs) > 1 else None


def frontier_verdict(d: Mapping[str, Any], metric: Metric) -> str:
    """``above`` / ``below`` the frontier when the distance clears 2 SE (better is ``above``:
    higher accuracy, lower loss), ``(within noise)`` when it does not or with one seed."""
    if not d["n"]:
        return "outside the frontier's range" if d["outside"] else "pending"
    better = d["mean"] if metric.higher_is_better else -d["mean"]
    if better == 0:
        return "on the frontier (within noise)"
    said = verdict("beats", better, d["se"] or 0.0, d["n"])
    return said.replace("not held", "below").replace("held", "above")


def _mean_std_text(values: Sequence[float], digits: int) -> str:
    mean, std = common.mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def frontier_rows(
    rows: Sequence[Row], lora: Sequence[Any], metrics: Sequence[Metric]
) -> list[dict[str, str]]:
    """One row per LoRA rank: parameters, each metric's mean ± std over seeds, lr, seeds."""
    out = []
    for cell in lora:
        runs = [r for r in test_rows(rows) if r["cell"] == cell.key]
        if not runs:
            continue
        row = {"LoRA rank": str(cell.r), "trainable params": f"{row_params(runs[0]):,}",
               "seeds": ",".join(sorted(r["seed"] for r in runs)),
               "lr": ", ".join(sorted({r["lr"] for r in runs})),
               "train s": f"{sum(float(r['train_s']) for r in runs) / len(runs):.0f}"}  # fmt: skip
        for m in metrics:
            vals = [m.scale * float(r[m.column]) for r in runs]
            row[m.name] = _mean_std_text(vals, 2 if m.scale > 1 else 4)
        out.append(row)
    return out


def probe_cost(rows: Sequence[Row], cell: Any) -> float:
    """The probe's seconds a contender's run depends on, mean over its seeds: for a planner
    that reads statistics, the probe of its seed (run once by the seed's first such cell and
    reused by the others, so their own ``probe_s`` is 0); else its own (EVA's and LoRA-GA's
    calibration pass; 0 for the rest)."""
    tests = test_rows(rows)
    own = [r for r in tests if r["cell"] == cell.key]
    if cell.method in PROBE_FREE:
        return max((float(r.get("probe_s") or 0) for r in own), default=0.0)
    per_seed = []
    for r in own:
        seed_probes = [float(x.get("probe_s") or 0) for x in tests if x["seed"] == r["seed"]
                       and x.get("method") not in PROBE_FREE]  # fmt: skip
        per_seed.append(max(seed_probes, default=0.0))
    return sum(per_seed) / len(per_seed) if per_seed else 0.0


def contender_rows(
    rows: Sequence[Row], contenders: Sequence[Any], lora: Sequence[str], metrics: Sequence[Metric]
) -> list[dict[str, str]]:
    """One row per contender: its parameters, each metric's distance to the frontier ± SE with
    a verdict, and its cost (probe or calibration pass, training)."""
    out = []
    for cell in contenders:
        runs = [r for r in test_rows(rows) if r["cell"] == cell.key]
        if not runs:
            continue
        params = [row_params(r) for r in runs]
        row = {"contender": cell.label, "budget": f"LoRA r={cell.budget}",
               "trainable params": f"{min(params):,}" + (
                   f"–{max(params):,}" if max(params) != min(params) else ""),
               "lr": ", ".join(sorted({r["lr"] for r in runs})),
               "probe s": f"{probe_cost(rows, cell):.1f}",
               "train s": f"{sum(float(r['train_s'] or 0) for r in runs) / len(runs):.0f}",
               }  # fmt: skip
        for m in metrics:
            d = distance(rows, cell.key, lora, m)
            digits = 2 if m.scale > 1 else 4
            text = "" if d["mean"] is None else f"{d['mean']:+.{digits}f}" + (
                f" ± {d['se']:.{digits}f}" if d["se"] is not None else " (one seed)")  # fmt: skip
            row[f"Δ {m.name} ({m.unit})"] = text
            row[f"{m.name}: verdict"] = frontier_verdict(d, m)
            row["seeds"] = ",".join(map(str, d["seeds"]))
        out.append(row)
    return out


def paired_difference(rows: Sequence[Row], a: str, b: str, metric: Metric) -> dict[str, Any]:
    """``a``'s score minus ``b``'s on the seeds both finished: ``mean``, ``se`` (None with one
    seed), ``n`` (0: no seed in common, ``mean`` None)."""
    sa, sb = by_seed(rows, a, metric), by_seed(rows, b, metric)
    diffs = [sa[s][1] - sb[s][1] for s in sorted(sa.keys() & sb.keys())]
    mean, se = _mean_se(diffs)
    return {"mean": mean, "se": se, "n": len(diffs)}


def _delta_text(d: Mapping[str, Any], metric: Metric) -> str:
    digits = 2 if metric.scale > 1 else 4
    if d["se"] is None:
        return f"{d['mean']:+.{digits}f} {metric.unit} (one seed)"
    return f"{d['mean']:+.{digits}f} ± {d['se']:.{digits}f} {metric.unit}"


def _side(d: Mapping[str, Any], metric: Metric) -> str:
    """``above`` / ``below`` (better / worse) when ``d`` clears 2 SE, else ``within noise``."""
    said = frontier_verdict(d, metric)
    return "within noise" if said.endswith("(within noise)") else said


def _against(rows: Sequence[Row], cells: Sequence[Any], base: Any, metric: Metric) -> str:
    """Each of ``cells`` minus ``base``, paired on the seeds both finished, in words."""
    vs = [(c, paired_difference(rows, c.key, base.key, metric)) for c in cells]
    said = "; ".join(f"{c.label} {_delta_text(d, metric)} ({_side(d, metric)})"
                     for c, d in vs if d["n"])  # fmt: skip
    return said or "none finished"


def answers(
    rows: Sequence[Row], contenders: Sequence[Any], lora: Sequence[str], metric: Metric
) -> list[str]:
    """Issue 31's three questions for ``metric``, one bullet per budget with a finished run."""
    bullets = (budget_answer(rows, [c for c in contenders if c.budget == b], lora, metric)
               for b in sorted({c.budget for c in contenders}))  # fmt: skip
    return [b for b in bullets if b]


def budget_answer(
    rows: Sequence[Row], at: Sequence[Any], lora: Sequence[str], metric: Metric
) -> str | None:
    """One budget's contenders ``at`` in words: which planners (group ``contender``) sit above
    the frontier by more than 2 SE (else the nearest), which peft peer (group ``peft``) is
    nearest it, each planner against the truncation control (group ``control``) and ``auto``
    against uniform LoRA on its candidate modules (group ``targets``), paired on the seeds both
    finished; None before any of them finished."""
    dist = {c.key: distance(rows, c.key, lora, metric) for c in at}
    done = [c for c in at if dist[c.key]["n"]]
    if not done:
        return None
    sign = 1 if metric.higher_is_better else -1
    nearest = {
        g: max((c for c in done if c.group == g), key=lambda c: sign * dist[c.key]["mean"],
               default=None)
        for g in ("contender", "peft")
    }  # fmt: skip
    planners = [c for c in done if c.group == "contender"]
    above = [c for c in planners if frontier_verdict(dist[c.key], metric) == "above"]
    parts = [f"**LoRA r={at[0].budget}'s budget, {metric.name}.**"]
    if above:
        parts.append("Above the frontier by more than 2 SE: " + ", ".join(
            f"{c.label} {_delta_text(dist[c.key], metric)}" for c in above) + ".")  # fmt: skip
    elif (near := nearest["contender"]) is not None:
        parts.append("No planner sits above the frontier by more than 2 SE; the nearest is "
                     f"{near.label}, {_delta_text(dist[near.key], metric)}.")  # fmt: skip
    if (peer := nearest["peft"]) is not None:
        said = frontier_verdict(dist[peer.key], metric).replace(" (within noise)", ", within noise")
        parts.append(f"Best peft peer: {peer.label}, {_delta_text(dist[peer.key], metric)} "
                     f"({said}).")  # fmt: skip
    for control in (c for c in done if c.group == "control"):
        parts.append(f"{control.label}: {_delta_text(dist[control.key], metric)} from the "
                     "frontier; the planners against it (planner − control, paired): "
                     f"{_against(rows, planners, control, metric)}.")  # fmt: skip
    autos = [c for c in planners if c.method == "auto"]
    for spread in (c for c in done if c.group == "targets"):
        parts.append(f"{spread.label} (auto's candidate modules, one rank everywhere): "
                     f"{_delta_text(dist[spread.key], metric)} from the frontier; auto against "
                     f"it (paired): {_against(rows, autos, spread, metric)}.")  # fmt: skip
    if pending := [c.label for c in at if not dist[c.key]["n"]]:
        parts.append(f"Not finished: {', '.join(pending)}.")
    return "- " + " ".join(parts)


AUTO_PAIRS = ((1, "lora"), (2, "lora"), (1, "gradient"), (2, "gradient"))  # the default first


def auto_validation(rows: Sequence[Row], cells: Sequence[Any], setup: Any) -> str | None:
    """``auto``'s power/init pairs on the validation split only (issue 32, item 5): each pair's
    validation score at its chosen learning rate per budget, and, once every pair finished at
    every budget, the pair with the best mean over the budgets. None without a learning-rate
    grid or before any auto cell chose its rate."""
    if not setup.lrs:
        return None
    auto = [c for c in cells if c.method == "auto" and c.budget]
    seed, scores = setup.select_seed, {}
    for c in auto:
        lr = chosen_lr(rows, c.key, setup.lrs, seed, setup.edge_steps)
        if lr is not None:
            pair = (c.options.get("power", 1), c.options.get("init", "lora"))
            score = 100 * float(select_accuracies(rows, c.key, seed)[lr]["accuracy"])
            scores.setdefault(pair, {})[c.budget] = score
    if not scores:
        return None
    budgets = sorted({c.budget for c in auto})
    text = (f"`auto`'s power/init pairs on the validation split (seed {seed}, each at its chosen "
            "learning rate; the test split is not read): " + "; ".join(
                f"power {p}, init {i}: " + ", ".join(
                    f"r={b}'s budget {scores[(p, i)][b]:.2f} %" for b in budgets
                    if b in scores[(p, i)])
                for p, i in AUTO_PAIRS if (p, i) in scores) + ".")  # fmt: skip
    if all(len(scores.get(pair, {})) == len(budgets) for pair in AUTO_PAIRS):
        mean = {pair: sum(scores[pair].values()) / len(budgets) for pair in AUTO_PAIRS}
        p, i = max(AUTO_PAIRS, key=lambda pair: mean[pair])  # ties: the earlier (default) pair
        default = mean[AUTO_PAIRS[0]]
        text += (f" Best mean over the budgets: power {p}, init {i} ({mean[(p, i)]:.2f} %; the "
                 f"library's default, power 1 and init lora: {default:.2f} %).")  # fmt: skip
    return text


def plot_frontier(
    rows: Sequence[Row], lora: Sequence[Any], contenders: Sequence[Any],
    metrics: Sequence[Metric], path: Path,
) -> Path:  # fmt: skip
    """Each metric against trainable parameters (log x): LoRA's mean line with its seed range
    shaded, each contender a point with ± one SD over seeds."""
    fig, axes = pyplot().subplots(1, len(metrics), figsize=(6.4 * len(metrics), 4.6), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        xs, mean, lo, hi = [], [], [], []
        for cell in lora:
            pts = by_seed(rows, cell.key, m)
            if pts:
                vals = [v for _, v in pts.values()]
                xs.append(sum(p for p, _ in pts.values()) / len(pts))
                mean.append(sum(vals) / len(vals))
                lo.append(min(vals))
                hi.append(max(vals))
        if xs:
            ax.plot(xs, mean, "o-", color="k", label="LoRA r = 1, 2, 4, … (mean)")
            ax.fill_between(xs, lo, hi, color="k", alpha=0.15, label="LoRA seed range")
        for i, cell in enumerate(contenders):
            pts = by_seed(rows, cell.key, m)
            if not pts:
                continue
            vals = [v for _, v in pts.values()]
            x = sum(p for p, _ in pts.values()) / len(pts)
            mu, sd = common.mean_std(vals)
            marker = "s" if cell.budget == 2 else "D"
            ax.errorbar([x], [mu], yerr=[sd], fmt=marker, color=f"C{i % 10}", capsize=3,
                        label=cell.label)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("trainable adapter parameters")
        ax.set_ylabel(m.name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best", ncol=2)
    return save_png(fig, path)


def write_frontier(folder: Path, setup: Any, cells: Sequence[Any], rows: Sequence[Row]) -> None:
    """frontier.md (the frontier, the contenders' distances) and frontier.png."""
    lora = sorted((c for c in cells if c.method == "lora" and not c.budget and not c.options),
                  key=lambda c: c.r)  # fmt: skip
    contenders = [c for c in cells if c.budget]
    metrics = metrics_for(setup.task)
    keys = [c.key for c in lora]
    names = ", ".join(m.name for m in metrics)
    text = (
        f"Capacity frontier, configuration `{setup.name}` ({names}; test split, each cell at its "
        "own learning rate). The frontier is uniform LoRA at each rank; a contender's Δ is its "
        "score minus the frontier's at its own parameter count, interpolated linearly in "
        "log(parameters) between the two LoRA ranks around it on the same seed, mean over "
        "seeds ± the standard error of the per-seed differences. `above`/`below`: the "
        "frontier is cleared by more than 2 SE (for the answer loss lower is better); "
        "`(within noise)` otherwise or with one seed. `probe s` is the probe, or the peer's "
        "own calibration pass (EVA, LoRA-GA): for a planner the probe of its seed, computed "
        "once and reused by the seed's other planners, mean over seeds; the truncation "
        "control's `train s` is its LoRA r=16 run's.\n\n"
        + common.markdown_table(frontier_rows(rows, lora, metrics),
                                ("LoRA rank", "trainable params", *(m.name for m in metrics),
                                 "seeds", "lr", "train s"))
        + "\n"
    )  # fmt: skip
    cols = ["contender", "budget", "trainable params"]
    for m in metrics:
        cols += [f"Δ {m.name} ({m.unit})", f"{m.name}: verdict"]
    cols += ["seeds", "lr", "probe s", "train s"]
    text += common.markdown_table(contender_rows(rows, contenders, keys, metrics), cols)
    said = [line for m in metrics for line in answers(rows, contenders, keys, m)]
    if auto := auto_validation(rows, cells, setup):
        said.append(f"- {auto}")
    if said:
        text += "\nIn words (generated from the table's runs):\n\n" + "\n".join(said) + "\n"
    if (untrained := folder / "untrained.txt").is_file():  # bench/quality/untrained.py
        scores = [line for line in untrained.read_text().splitlines() if line.startswith("test:")]
        text += f"\nThe untrained model (no adapter, `bench/quality/untrained.py`), {scores[0]}.\n"
    atomic_write_text(folder / "frontier.md", text)
    with contextlib.suppress(ImportError):  # matplotlib is optional
        if any(by_seed(rows, k, metrics[0]) for k in keys):
            plot_frontier(rows, lora, contenders, metrics, folder / "frontier.png")

"""The learning-rate reading of ``bench/quality/quality.py``'s runs.csv: which learning rate
each cell chose, the selection table and the learning-rate sweep (table and plot).

Rows are runs.csv's (strings, as ``csv.DictReader`` gives them). ``select`` rows (the grid's
learning-rate selection) and ``sweep`` rows (``--lr-sweep``, its own number of steps) were
trained on the training split minus its validation slice and evaluated on that slice; ``test``
rows (or rows without a phase: grids written before LR selection existed) on the test split.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import common
from entrolora.files import atomic_write_text, pyplot, save_png

Row = Mapping[str, str]


# -- rows -------------------------------------------------------------------------------------
def phase(row: Row) -> str:
    """``select`` or ``test`` (rows written before LR selection existed are test rows)."""
    return row.get("phase") or "test"


def lr_text(lr: float) -> str:
    """The spelling of a learning rate in keys, folder names and tables (``2e-03`` → ``0.002``)."""
    return f"{lr:g}"


def row_lr(row: Row, default: float) -> float:
    """The learning rate a run trained at (``default``: the setup's, for rows without one)."""
    return float(row["lr"]) if row.get("lr") else default


def test_rows(rows: Sequence[Row]) -> list[Row]:
    return [r for r in rows if phase(r) == "test"]


def select_accuracies(
    rows: Sequence[Row], cell: str, seed: int, kind: str = "select"
) -> dict[float, Row]:
    """``{lr: row}`` of the ``kind`` (select or sweep) runs of ``cell`` on ``seed``."""
    out: dict[float, Row] = {}
    for r in rows:
        if phase(r) == kind and r["cell"] == cell and int(r["seed"]) == seed:
            out.setdefault(float(r["lr"]), r)
    return out


EDGE_STEPS = 2  # validation runs beyond each end of the grid, at most


def _best(runs: Mapping[float, Row], lrs: Sequence[float]) -> float:
    """Best validation accuracy, then lower validation loss, then the smaller learning rate."""
    return max(
        lrs, key=lambda lr: (float(runs[lr]["accuracy"]), -float(runs[lr]["eval_loss"]), -lr)
    )


def _extend(
    runs: Mapping[float, Row], lrs: Sequence[float], edge: int = EDGE_STEPS
) -> tuple[list[float], float | None]:
    """``(learning rates compared, the next one to run or None once the choice is made)``.

    While the best so far is an end of what was tried, the rate one step beyond it (×2 above,
    ÷2 below; at most ``edge`` each side) is tried too: a method whose best learning rate
    lies outside the grid is not judged at the grid's edge. Doubling is exact in binary, so
    the extended rates' keys match the rates read back from runs.csv."""
    tried = sorted(lrs)
    top, bottom = max(lrs) * 2**edge, min(lrs) / 2**edge
    while True:
        best = _best(runs, tried)
        if best == tried[-1] and tried[-1] < top:
            step = tried[-1] * 2
        elif best == tried[0] and tried[0] > bottom:
            step = tried[0] / 2
        else:
            return tried, None
        if step not in runs:
            return tried, step
        tried = sorted([*tried, step])


def needed_lrs(
    rows: Sequence[Row], cell: str, lrs: Sequence[float], seed: int, edge: int = EDGE_STEPS
) -> list[float]:
    """The learning rates whose validation runs ``cell``'s choice still waits for: those of the
    grid without a run, else the next rate beyond the grid's edge (``_extend``), else none."""
    runs = select_accuracies(rows, cell, seed)
    missing = [lr for lr in lrs if lr not in runs]
    if missing:
        return missing
    step = _extend(runs, lrs, edge)[1]
    return [] if step is None else [step]


def chosen_lr(
    rows: Sequence[Row], cell: str, lrs: Sequence[float], seed: int, edge: int = EDGE_STEPS
) -> float | None:
    """The learning rate with the best validation accuracy of ``cell`` on ``seed``: over the
    grid ``lrs`` and the rates tried beyond its edges (``_extend``).

    Ties go to the lower validation loss, then to the smaller learning rate. None while a
    validation run it needs has not finished.
    """
    if needed_lrs(rows, cell, lrs, seed, edge):
        return None
    runs = select_accuracies(rows, cell, seed)
    return _best(runs, _extend(runs, lrs, edge)[0])


def current_rows(
    rows: Sequence[Row],
    lrs: Sequence[float],
    seed: int,
    edge: int = EDGE_STEPS,
    alias: Mapping[str, str] | None = None,
) -> list[Row]:
    """``rows`` without the test runs made at a learning rate their cell does not choose now.

    A cell's choice can move after its test runs (a validation run beyond the grid's edge came
    in later): those runs stay in runs.csv as history and are run again at the new rate. While
    the choice waits for a validation run, the cell has no current test run. Grids without a
    learning-rate grid (``lrs`` empty) keep every row. ``alias``: ``{cell: the cell whose
    learning rate it runs at}`` (the truncation control reuses LoRA r=16's runs)."""
    if not lrs:
        return list(rows)
    chosen: dict[str, float | None] = {}

    def current(row: Row) -> bool:
        if phase(row) != "test":
            return True
        cell = row["cell"]
        if cell not in chosen:
            chosen[cell] = chosen_lr(rows, (alias or {}).get(cell, cell), lrs, seed, edge)
        return chosen[cell] is not None and float(row["lr"]) == chosen[cell]

    return [r for r in rows if current(r)]


# -- learning rates -----------------------------------------------------------------------------
def lr_selection_rows(
    rows: Sequence[Row],
    cells: Sequence[Any],
    lrs: Sequence[float],
    seed: int,
    edge: int = EDGE_STEPS,
) -> list[dict[str, str]]:
    """Per cell, validation accuracy % at each learning rate of the grid and beyond its edge
    (``_extend``); the chosen in bold."""
    out = []
    for cell in cells:
        runs = select_accuracies(rows, cell.key, seed)
        best = chosen_lr(rows, cell.key, lrs, seed, edge)
        row = {"method": cell.label, "chosen lr": lr_text(best) if best else "pending"}
        for lr in lrs:
            row[lr_text(lr)] = _acc_text(runs[lr], lr == best) if lr in runs else ""
        tried = _extend(runs, lrs, edge)[0] if all(lr in runs for lr in lrs) else lrs
        row["beyond the grid"] = ", ".join(
            f"{lr_text(lr)}: {_acc_text(runs[lr], lr == best)}" for lr in tried if lr not in lrs
        )
        out.append(row)
    return out


def _acc_text(row: Row, chosen: bool) -> str:
    text = f"{100 * float(row['accuracy']):.2f}"
    return f"**{text}**" if chosen else text


def sweep_points(
    rows: Sequence[Row], cells: Sequence[str], seed: int, kind: str = "sweep"
) -> dict[str, dict]:
    """``{cell: {lr: row}}`` of the ``kind`` runs of ``cells`` on ``seed``."""
    return {c: select_accuracies(rows, c, seed, kind) for c in cells}


def sweep_rows(
    points: Mapping[str, Mapping[float, Row]],
    labels: Mapping[str, str],
    short: Mapping[str, Mapping[float, Row]] | None = None,
) -> list[dict[str, str]]:
    """One row per learning rate: each cell's validation accuracy and final training loss in
    the sweep, and (``short``) its validation accuracy in the grid's selection runs."""
    short = short or {}
    lrs = sorted({lr for runs in points.values() for lr in runs})
    out = []
    for lr in lrs:
        row = {"lr": lr_text(lr)}
        for cell, runs in points.items():
            r = runs.get(lr)
            row[f"{labels[cell]} acc %"] = f"{100 * float(r['accuracy']):.2f}" if r else ""
            loss = r.get("train_loss") if r else None
            row[f"{labels[cell]} train loss"] = f"{float(loss):.3f}" if loss else ""
            s = short.get(cell, {}).get(lr)
            row[f"{labels[cell]} acc % (grid steps)"] = (
                f"{100 * float(s['accuracy']):.2f}" if s else ""
            )
        majority = [runs[lr].get("heldout_majority") for runs in points.values() if lr in runs]
        row["majority %"] = f"{100 * float(majority[0]):.2f}" if majority and majority[0] else ""
        out.append(row)
    return out


def plot_sweep(
    points: Mapping[str, Mapping[float, Row]],
    labels: Mapping[str, str],
    path: Path,
    short: Mapping[str, Mapping[float, Row]] | None = None,
    steps: tuple[int | None, int | None] = (None, None),
) -> Path:
    """Validation accuracy against learning rate (log axis), one line per cell: the sweep's
    runs solid, the grid's shorter selection runs (``short``) dashed in the same colour."""
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2))
    majority = None
    for i, cell in enumerate(points):
        for runs, style, n in (
            (points[cell], "o-", steps[0]),
            ((short or {}).get(cell, {}), "s--", steps[1]),
        ):
            lrs = sorted(runs)
            if not lrs:
                continue
            acc = [100 * float(runs[lr]["accuracy"]) for lr in lrs]
            label = labels[cell] + (f", {n} steps" if n else "")
            ax.plot(
                lrs, acc, style, color=f"C{i}", label=label, alpha=1.0 if style == "o-" else 0.6
            )
            majority = majority or runs[lrs[0]].get("heldout_majority")
    if majority:
        ax.axhline(100 * float(majority), color="grey", ls=":", lw=1, label="majority class")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (AdamW)")
    ax.set_ylabel("validation accuracy %")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def write_sweep(folder: Path, setup: Any, rows: Sequence[Row], cells: Sequence[Any]) -> None:
    """lr_sweep.md and lr_sweep.png from the sweep runs of ``cells`` (when any exist)."""
    labels = {c.key: c.label for c in cells}
    points = sweep_points(rows, list(labels), setup.select_seed)
    if not any(points.values()):
        return
    short = sweep_points(rows, list(labels), setup.select_seed, "select")
    steps = setup.sweep_steps or setup.max_steps
    cols = (
        "lr",
        *(
            f"{labels[c]} {k}"
            for c in labels
            for k in ("acc %", "train loss", "acc % (grid steps)")
        ),
        "majority %",
    )
    atomic_write_text(
        folder / "lr_sweep.md",
        f"Learning-rate sweep, configuration `{setup.name}`, seed {setup.select_seed}, "
        f"{steps} steps of {setup.batch_size}: validation accuracy and the mean training loss "
        "of the last 20 steps against the peak learning rate (trained on the training split "
        "without its validation slice, evaluated on the slice). `acc % (grid steps)`: the "
        f"same on the grid's learning-rate selection runs ({setup.max_steps} steps), where "
        "they exist.\n\n" + common.markdown_table(sweep_rows(points, labels, short), cols),
    )
    with contextlib.suppress(ImportError):  # matplotlib is optional
        plot_sweep(points, labels, folder / "lr_sweep.png", short, (steps, setup.max_steps))

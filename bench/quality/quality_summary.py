"""The reading of ``bench/quality/quality.py``'s runs.csv: tables, claims, LR
selection and the LR sweep.

Pure functions of the rows (strings, as ``csv.DictReader`` gives them) and the cells, except
``write_summary``, which writes the files (atomically). Two kinds of rows:

* ``phase`` ``test`` (or empty: grids written before LR selection existed): trained on the
  seed's whole training split at the cell's chosen learning rate, evaluated on the test split.
  They make the results table and the claims.
* ``phase`` ``select``: trained on the training split minus its validation slice, evaluated on
  that slice (the test split is never read). They choose each cell's learning rate and make
  the LR-selection and LR-sweep tables.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quality_grid import aliases, selects
from quality_lr import (
    current_rows,
    lr_selection_rows,
    lr_text,
    phase,
    test_rows,
    write_sweep,
)

import common
from entrolora.files import atomic_write_text

Row = Mapping[str, str]


# -- rows -------------------------------------------------------------------------------------
def row_params(row: Row) -> int:
    """Trainable adapter parameters of a run as its plan counts them (peft runs: peft's count).

    The plan count is the one ``train_run`` reports since FlexLoRA's was aligned with it: for
    FlexLoRA, its ``r`` active directions (+ λ), not the ``capacity`` it allocates.
    """
    return int(row.get("plan_params") or row["trainable_params"])


def params_text(values: Sequence[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"  # plans can differ by seed (data)


# -- the results table --------------------------------------------------------------------------
def summarize(rows: Sequence[Row], cells: Sequence[Any], lr: float | None = None) -> list[dict]:
    """One dict per cell with a finished test run: mean ± std accuracy, lr, times and memory.

    ``lr``: the learning rate of rows that do not record one (grids before LR selection).
    """
    out = []
    rows = test_rows(rows)
    for cell in cells:
        runs = [r for r in rows if r["cell"] == cell.key]
        if not runs:
            continue
        acc = [100 * float(r["accuracy"]) for r in runs]
        mean, std = common.mean_std(acc)
        mems = [float(r["peak_memory_mib"]) for r in runs if r.get("peak_memory_mib")]
        out.append(
            {
                "cell": cell,
                "n": len(runs),
                "seeds": sorted(int(r["seed"]) for r in runs),
                "acc_mean": mean,
                "acc_std": std,
                "lrs": sorted({r.get("lr") or (str(lr) if lr else "") for r in runs}),
                "params": [row_params(r) for r in runs],
                "head": int(runs[0]["head_params"] or 0),
                "train_s": common.mean_std([float(r["train_s"]) for r in runs])[0],
                "probe_s": max(float(r.get("probe_s") or 0) for r in runs),
                "mem": max(mems) if mems else None,
            }
        )
    return out


def is_sft(setup: Any) -> bool:
    """Whether ``setup`` is an instruction-tuning grid (``--task sft``, the shipped math set)."""
    return getattr(setup, "task", "classify") == "sft"


def score_name(setup: Any) -> str:
    """What a run's ``accuracy`` holds: exact match for ``--task sft``, else accuracy."""
    return "exact match %" if is_sft(setup) else "accuracy %"


def table_columns(score: str) -> tuple[str, ...]:
    """table.md/.csv's columns, the score named as ``score_name`` names it."""
    return ("method", "group", "lr", "trainable params", f"{score} (mean ± std)", "seeds",
            "train s", "probe s", "peak MiB")  # fmt: skip


def table_rows(
    summary: Sequence[Mapping[str, Any]], n_seeds: int, score: str = "accuracy %"
) -> list[dict[str, str]]:
    return [
        {
            "method": s["cell"].label,
            "group": s["cell"].group,
            "lr": ", ".join(lr_text(float(x)) for x in s["lrs"] if x) or "",
            "trainable params": params_text(s["params"]),
            f"{score} (mean ± std)": f"{s['acc_mean']:.2f} ± {s['acc_std']:.2f}"
            if s["n"] > 1
            else f"{s['acc_mean']:.2f} (one seed)",
            "seeds": f"{s['n']}/{n_seeds}",
            "train s": f"{s['train_s']:.1f}",
            "probe s": f"{s['probe_s']:.1f}" if s["probe_s"] else "",
            "peak MiB": common.fmt(s["mem"], 0),
        }
        for s in summary
    ]


# -- the claims ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    """A paper's (or an issue's) claim: candidate cell ``a`` against reference cell ``b``.

    ``kind``: ``beats`` needs a higher mean; ``matches`` a mean no lower than the reference's
    by more than max(0.5 pp, 2 SE); ``at-least`` a mean no lower than the reference's by more
    than ``margin`` pp; ``not-below`` a mean no lower by more than 2 SE ("within noise or
    above"). A claim made "with fewer parameters" also fails above ``max_ratio``.
    """

    text: str
    a: str
    b: str
    kind: str
    max_ratio: float | None = None
    margin: float = 0.0


CLAIMS = (
    Claim("E²LoRA matches LoRA with about half the parameters (E²LoRA)", "e2lora-r8", "lora-r8",
          "matches", 0.75),
    Claim("E²ShareLoRA beats ShareLoRA with fewer parameters (E²LoRA)", "e2sharelora-r8",
          "sharelora-r8", "beats", 0.999),
    Claim("E²LoRA r=8 beats LoRA r=4 at matched parameters (E²LoRA Table 5)", "e2lora-r8",
          "lora-r4", "beats"),
    Claim("E²LoRA r=16 beats LoRA r=8 at matched parameters (E²LoRA Table 5)", "e2lora-r16",
          "lora-r8", "beats"),
    Claim("full E²LoRA beats LSS only (E²LoRA Table 4)", "e2lora-r8", "e2lora-lss-only", "beats"),
    Claim("full E²LoRA beats HRA only (E²LoRA Table 4; not in the paper either)", "e2lora-r8",
          "e2lora-hra-only", "beats"),
    Claim("RMI similarity beats cosine (E²LoRA Table 4)", "e2lora-r8", "e2lora-cosine", "beats"),
    Claim("RMI similarity beats L1 (E²LoRA Table 4)", "e2lora-r8", "e2lora-l1", "beats"),
    Claim("RMI similarity beats L2 (E²LoRA Table 4)", "e2lora-r8", "e2lora-l2", "beats"),
    Claim("RMI similarity beats KL (E²LoRA Table 4)", "e2lora-r8", "e2lora-kl", "beats"),
    Claim("RaLoRA beats LoRA at equal parameters (RaLoRA)", "ralora-r8", "lora-r8", "beats"),
    Claim("RaLoRA-Pro beats LoRA (RaLoRA)", "ralora-pro-r8", "lora-r8", "beats"),
    Claim("FlexLoRA beats AdaLoRA at equal budget (FlexLoRA)", "flexlora-r8", "peft-adalora-r8",
          "beats"),
    Claim("FlexLoRA ≥ LoRA r=8 − 0.5 pp (issue 12)", "flexlora-r8", "lora-r8", "at-least",
          margin=0.5),
    Claim("FlexLoRA ≥ peft AdaLoRA (issue 12)", "flexlora-r8", "peft-adalora-r8", "at-least"),
    Claim("E²LoRA: signal statistics not below raw (issue 14)", "e2lora-r8", "e2lora-r8-raw",
          "not-below"),
    Claim("RaLoRA: signal statistics not below raw (issue 14)", "ralora-r8", "ralora-r8-raw",
          "not-below"),
    Claim("entrolora LoRA matches peft LoRA (sanity)", "lora-r8", "peft-lora-r8", "matches"),
    Claim("E²LoRA: gated boundaries not below greedy (issue 33)", "e2lora-r8", "e2lora-r8-greedy",
          "not-below"),
    Claim("E²LoRA at r=8's size: gated boundaries not below greedy (issue 33)", "e2lora-at-r8",
          "e2lora-at-r8-greedy", "not-below"),
)  # fmt: skip


def verdict(kind: str, delta: float, se: float, n: int, margin: float = 0.0) -> str:
    """``held`` / ``not held``, ``(within noise)`` when the gap to the threshold is under 2 SE.

    One seed has no error bar, so its verdicts are always ``(within noise)``.
    """
    noise = 2 * se
    if kind == "beats":
        if delta > 0:
            return "held" if (n > 1 and delta > noise) else "held (within noise)"
        return "not held" if (n > 1 and -delta > noise) else "not held (within noise)"
    if kind == "at-least":
        out = "held" if delta >= -margin else "not held"
        clear = n > 1 and abs(delta + margin) > noise
        return out if clear else f"{out} (within noise)"
    if kind == "not-below":
        if n < 2:
            return "pending (needs two seeds for an error bar)"
        return "held" if delta >= -noise else "not held"
    if kind != "matches":
        raise ValueError(f"unknown claim kind {kind!r}; use beats, matches, at-least or not-below")
    out = "held" if delta >= -max(0.5, noise) else "not held"
    return out if n > 1 else f"{out} (within noise)"


def seeds_for_se(sd: float, n: int, target: float = 1.0) -> str:
    """Whether the SE of a paired difference is under ``target`` pp, else the seeds it needs.

    With per-seed differences of sample standard deviation ``sd`` the SE over m seeds is
    sd/√m, so SE < target needs m > (sd/target)²; the estimate of ``sd`` from ``n`` seeds is
    itself rough, so this is an order of magnitude.
    """
    if n < 2:
        return "needs ≥ 2 seeds"
    if sd / math.sqrt(n) < target:
        return f"met ({n} seeds)"
    return f"≈ {math.floor((sd / target) ** 2) + 1} seeds"


def claims_rows(rows: Sequence[Row], cells: Sequence[Any]) -> list[dict[str, str]]:
    """Each claim of ``CLAIMS`` whose two cells are in ``cells``, on the seeds both finished.

    A seed fixes the data split, so the two cells are compared pairwise: Δ is the mean over
    common seeds of (candidate − reference) test accuracy, ± the standard error of those
    per-seed differences.
    """
    acc: dict[str, dict[int, float]] = {}
    params: dict[str, dict[int, int]] = {}
    for r in test_rows(rows):
        acc.setdefault(r["cell"], {})[int(r["seed"])] = 100 * float(r["accuracy"])
        params.setdefault(r["cell"], {})[int(r["seed"])] = row_params(r)
    label = {c.key: c.label for c in cells}
    out = []
    for c in CLAIMS:
        if c.a not in label or c.b not in label:
            continue  # not a cell of this grid
        seeds = sorted(set(acc.get(c.a, {})) & set(acc.get(c.b, {})))
        if not seeds:
            out.append({"claim": c.text, "verdict": "pending (cells not run on a common seed yet)"})
            continue
        n = len(seeds)
        mean_a = sum(acc[c.a][s] for s in seeds) / n
        mean_b = sum(acc[c.b][s] for s in seeds) / n
        delta, sd = common.mean_std([acc[c.a][s] - acc[c.b][s] for s in seeds])
        se = sd / n**0.5
        ratio = sum(params[c.a][s] for s in seeds) / sum(params[c.b][s] for s in seeds)
        said = verdict(c.kind, delta, se, n, c.margin)
        if c.max_ratio is not None and ratio > c.max_ratio:
            said = f"not held (parameter ratio {ratio:.2f} > {c.max_ratio:g}; accuracy: {said})"
        out.append(
            {
                "claim": c.text,
                "ours": f"{label[c.a]}: {mean_a:.2f} vs {label[c.b]}: {mean_b:.2f}",
                "Δ acc (pp)": f"{delta:+.2f} ± {se:.2f}"
                if n > 1
                else f"{delta:+.2f} (one seed: no error bar)",
                "params ratio": f"{ratio:.2f}",
                "seeds": ",".join(map(str, seeds)),
                "SE < 1 pp": seeds_for_se(sd, n),
                "verdict": said,
            }
        )
    flex = flex_rank_claim(rows, label)
    if flex is not None:
        out.append(flex)
    return out


def flex_rank_claim(rows: Sequence[Row], label: Mapping[str, str]) -> dict[str, str] | None:
    """Issue 12's "at least one module ends at a rank ≠ r₀", from ``flex_ranks_moved``."""
    if "flexlora-r8" not in label:
        return None
    text = "FlexLoRA: a module ends at a rank ≠ r₀ (issue 12)"
    runs = [r for r in test_rows(rows) if r["cell"] == "flexlora-r8" and r.get("flex_ranks_moved")]
    if not runs:
        return {"claim": text, "verdict": "pending (no FlexLoRA run with a rank history yet)"}
    runs.sort(key=lambda r: int(r["seed"]))
    moved = [int(r["flex_ranks_moved"].split("/")[0]) for r in runs]
    return {
        "claim": text,
        "ours": "; ".join(f"seed {r['seed']}: {r['flex_ranks_moved']} modules" for r in runs),
        "seeds": ",".join(r["seed"] for r in runs),
        "verdict": "held" if all(m > 0 for m in moved) else
        f"not held ({sum(m == 0 for m in moved)} of {len(moved)} runs end at r₀ everywhere)",
    }  # fmt: skip


CLAIM_COLUMNS = ("claim", "ours", "Δ acc (pp)", "params ratio", "seeds", "SE < 1 pp", "verdict")


# -- the files ----------------------------------------------------------------------------------
def settings_text(setup: Any) -> str:
    sft = is_sft(setup)
    held = ("the set's own validation split" if sft else f"{setup.validation_fraction:.0%} of "
            "the training split, cut like the test split: by film")  # fmt: skip
    lr = (
        f"lr chosen per cell from {[lr_text(x) for x in setup.lrs]} by validation "
        f"{score_name(setup)[:-2]} on seed {setup.select_seed} (validation: {held})"
        if setup.lrs
        else f"lr {setup.lr}"
    )
    data = "the shipped math set (--task sft)" if sft else "Rotten Tomatoes snippets, film split"
    return (
        f"model {setup.model or 'MiniLM (all-MiniLM-L6-v2)'}, data "
        f"{setup.data or data}, limit {setup.limit}, "
        f"{setup.epochs} epoch(s), max_steps {setup.max_steps}, batch {setup.batch_size}, "
        f"max length {setup.max_length}, {lr}, probe steps {setup.probe_steps}, "
        f"seeds {list(setup.seeds)}, torch threads per run {setup.threads or 'default'}"
    )


def measured_text(rows: Sequence[Row]) -> str:
    if not rows:
        return "Nothing measured yet."
    machines = sorted({r["machine"] for r in rows if r.get("machine")})
    dates = sorted(r["finished"] for r in rows if r.get("finished"))
    unlogged = sum(1 for r in rows if not r.get("machine"))
    return (
        f"Measured on {' / '.join(machines) or 'an unrecorded machine'}"
        + (f"; runs finished {dates[0]} – {dates[-1]}" if dates else "")
        + (f" ({unlogged} run(s) written before machine and date were logged)" if unlogged else "")
        + "."
    )


def table_note(
    setup: Any, rows: Sequence[Row], summary: Sequence[Mapping[str, Any]], header: str,
    failed: Sequence[str],
) -> str:  # fmt: skip
    """table.md's text above the table: settings, machine, ``header`` (command and progress),
    the failed runs, and what each column counts."""
    return (
        f"Configuration `{setup.name}`: {settings_text(setup)}.\n\n{measured_text(rows)} "
        f"{header}"
        + (f" Failed in the last invocation: {', '.join(failed)}." if failed else "")
        + "\n\n"
        + (
            "Trainable parameters exclude the classifier head, which every method trains "
            f"({summary[0]['head'] if summary else 0:,} parameters), and are"
            if not is_sft(setup)
            else "Exact match: under teacher forcing the argmax at every answer position, EOS "
            "included, is the answer's token (what greedy decoding emits). Trainable "
            "parameters are the adapters' (no head trains), and are"
        )
        + " counted as the plan counts them (FlexLoRA: its r active directions and λ, not the "
        "2r capacity it allocates; peft methods: peft's count); a range means the plan "
        "differed by seed. `lr` is the learning rate the cell ran at. `train s` is the "
        "training loop's mean time; `probe s` the gradient probe of the run that computed the "
        "statistics (later cells of the same seed reuse them); `peak MiB` is CUDA "
        "max_memory_allocated on a GPU, the run process's peak RSS on the CPU.\n\n"
    )


def write_lr_selection(
    folder: Path, setup: Any, rows: Sequence[Row], cells: Sequence[Any], score: str
) -> None:
    """lr_selection.md: each selecting cell's validation score at every learning rate tried."""
    own = [c for c in cells if selects(c)]
    lrows = lr_selection_rows(rows, own, setup.lrs, setup.select_seed, setup.edge_steps)
    cols = ("method", *(lr_text(x) for x in setup.lrs), "beyond the grid", "chosen lr")
    atomic_write_text(
        folder / "lr_selection.md",
        f"Validation {score} (seed {setup.select_seed}; "
        + (
            "trained on the training split, evaluated on the set's validation split"
            if is_sft(setup)
            else "trained on the training split without its "
            "validation slice, evaluated on the slice"
        )
        + ") at each learning rate of "
        "the grid and, where the best was at an end of it, one or two rates beyond that "
        "end (×2 above, ÷2 below); the chosen one in bold (ties: lower validation loss)."
        "\n\n" + common.markdown_table(lrows, cols),
    )


def write_summary(
    folder: Path,
    setup: Any,
    cells: Sequence[Any],
    header: str,
    failed: Sequence[str] = (),
    sweep_cells: Sequence[Any] = (),
) -> None:
    """Rewrite table.md/.csv, claims.md, lr_selection.md, lr_sweep.md and the plots (atomic).

    ``failed`` names the runs of this invocation that failed (they are retried on resume).
    """
    rows = current_rows(common.read_rows(folder / "runs.csv"), setup.lrs, setup.select_seed,
                        setup.edge_steps, aliases(cells))  # fmt: skip
    summary = summarize(rows, cells, setup.lr)
    score = score_name(setup)
    trows = table_rows(summary, len(setup.seeds), score)
    done = sum(s["n"] for s in summary)
    total = len(cells) * len(setup.seeds)
    keys = {c.key for c in cells}
    selected = sum(
        1 for r in rows if phase(r) == "select" and r["cell"] in keys
        and int(r["seed"]) == setup.select_seed and float(r["lr"]) in setup.lrs
    )  # fmt: skip
    progress = f"Finished test runs: {done} of {total} (cells × seeds)" + (
        f"; learning-rate selection runs: {selected} of {len(cells) * len(setup.lrs)}"
        if setup.lrs
        else ""
    )
    note = table_note(setup, rows, summary, f"{header}\n\n{progress}.", failed)
    columns = table_columns(score)
    atomic_write_text(folder / "table.md", note + common.markdown_table(trows, columns))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(trows)
    atomic_write_text(folder / "table.csv", buf.getvalue())
    twins = "; ".join(f"{c.label}, which runs at `{c.lr_of}`'s" for c in cells if c.lr_of)
    own_lr_note = f" (except {twins})" if setup.lrs and twins else ""
    atomic_write_text(
        folder / "claims.md",
        f"Configuration `{setup.name}`; {done} of {total} test runs finished. Each claim "
        f"compares its two cells, {'each at its own' if setup.lrs else 'both at the same'} "
        f"learning rate{own_lr_note}, on the seeds both finished (a seed fixes the data "
        f"split): `ours` gives their mean test {score[:-2]} over those seeds, "
        "Δ the mean per-seed difference ± its standard error (SE), and `SE < 1 pp` whether "
        "that SE is under 1 pp or about how many seeds would bring it there. A claim is `held` "
        "when Δ has the claimed sign and clears its threshold by more than twice the SE, "
        "`(within noise)` when it does not (always with one seed); `matches` holds when the "
        "candidate is at most max(0.5 pp, 2 SE) below, `not below` when it is at most 2 SE "
        "below.\n\n" + common.markdown_table(claims_rows(rows, cells), CLAIM_COLUMNS),
    )
    if setup.lrs:
        write_lr_selection(folder, setup, rows, cells, score)
    if sweep_cells:
        write_sweep(folder, setup, rows, sweep_cells)
    if getattr(setup, "frontier", False):
        import frontier

        frontier.write_frontier(folder, setup, cells, rows)
    if summary:
        try:
            from entrolora.report import plot_accuracy_vs_params

            runs = [
                {"method": s["cell"].label, "accuracy": s["acc_mean"] / 100,
                 "trainable_params": sum(s["params"]) / len(s["params"])}
                for s in summary
            ]  # fmt: skip
            plot_accuracy_vs_params(runs, folder / "accuracy_vs_params.png")
        except ImportError:  # matplotlib is optional
            pass

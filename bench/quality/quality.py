"""Do the papers' quality claims hold? A grid of methods × seeds trained by ``train_run``, each
method at its own learning rate, chosen on data the test never sees.

    python bench/quality/quality.py --config cpu --jobs 2 --threads 1  # MiniLM, all data, 2 cores
    python bench/quality/quality.py --config cpu --lr-sweep --threads 1  # LoRA, RaLoRA against lr
    python bench/quality/quality.py --config gpu --jobs 4               # MiniLM, 3 epochs, on a GPU
    python bench/quality/quality.py --config cpu-quick --jobs 2 --threads 1  # 2,000-snippet grid
    python bench/quality/quality.py --config cpu-quick --model smollm2  # SmolLM2-135M, not MiniLM
    python bench/quality/quality.py --smoke                   # tiny random BERT + tiny CSV, CI
    python bench/quality/quality.py --config rt-lowbudget --jobs 2 --threads 1  # the frontier
    python bench/quality/quality.py --config math-cpu --jobs 2 --threads 1  # it on --task sft
    python bench/quality/quality.py --smoke --config rt-lowbudget  # (or math-cpu): tiny models

The frontier configurations (issue 31; ``Setup.frontier``) add frontier.md and frontier.png
(``frontier.py``): LoRA at every rank and each contender's distance to it at its own parameter
count. Their truncation cells (``truncate-at-r2/8``) train nothing: each cuts the LoRA r=16
test run of its seed (``truncation.py``) and runs once that run is recorded, at its lr.

Every cell is a method with its options (``quality_cells.CELLS``); all cells of a
configuration share the data (Rotten Tomatoes snippets, split by film), seeds, steps, batch
size and length, so the only differences between two cells are the adapter and its learning
rate. A configuration with a learning-rate grid (``Setup.lrs``) first trains every cell at every
learning rate of the grid on seed ``select_seed``, on that seed's training split minus a
validation slice (``validation_fraction`` of it, by film), and evaluates on the slice: the test
split is never read. Each cell then runs every seed at the learning rate with the best
validation accuracy, trained on the whole training split and evaluated on the test split.

Each run is its own process (so that the CPU peak RSS is that run's own; ``--jobs N`` runs N at
a time) and is appended to ``bench/results/<config>/runs.csv`` (``phase`` select or test) as
soon as it finishes; a rerun skips the finished runs, and a run in flight in another process
(a claim file in the work folder) is left to it. After every run the summary is rewritten
(``quality_summary.write_summary``): ``table.md`` / ``table.csv`` (mean ± std over seeds, the
chosen learning rate), ``claims.md``, ``lr_selection.md``, ``lr_sweep.md`` and the plots.

The probe statistics of a seed are computed once per training set (the selection runs probe
the training split without the validation slice) by the first cell that needs them, which
saves them with the probed gradients (``TrainConfig.keep_gradients``), and reused by the later
cells (``TrainConfig.stats``); their cost is the ``probe s`` column of the cell that probed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import quality_lr as ql  # noqa: E402
import quality_summary as qs  # noqa: E402
from quality_cells import CELLS, CONFIGS, SMOKE_CELLS, SMOKE_FRONTIER, Cell, Setup  # noqa: E402, F401
from quality_grid import (  # noqa: E402
    Grid,
    Hooks,
    Task,
    aliases,
    grid_tasks,
    lr_source,
    selects,
    source_of,
)
from quality_run import (  # noqa: E402
    MATCHED,
    PROBE_FREE,
    flex_ranks_moved,
    probes,
    smoke_assets,
    train_config,
    worker,
)

import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "runs" / "bench-quality"  # run folders (adapters, plans): large, not committed


RUN_FIELDS = (
    "config", "cell", "label", "group", "method", "r", "options", "phase", "lr", "seed",
    "accuracy", "eval_loss", "train_loss", "trainable_params", "head_params", "plan_params",
    "flex_ranks_moved", "probe_s", "train_s", "total_s", "steps", "peak_memory_mib",
    "peak_memory_kind", "train_examples", "test_examples", "val_examples", "heldout_majority",
    "stats_reused", "device", "torch_version", "machine", "finished",
)  # fmt: skip


# -- one run ----------------------------------------------------------------------------------
def run_cell(setup: Setup, task: Task, lr: float, work: Path, stats: str | None) -> dict:
    """Train ``task`` at ``lr``, in a fresh process when ``setup.isolate``; its runs.csv row.

    RuntimeError with the run's last output lines when the subprocess fails.
    """
    cell, seed = task.cell, task.seed
    out = work / task.name
    if task.phase == "sweep":  # the sweep trains for its own number of steps
        setup = replace(setup, max_steps=setup.sweep_steps or setup.max_steps)
    cfg = train_config(setup, cell, seed, lr, out, stats)
    validation = setup.validation_fraction if task.phase != "test" else None
    if setup.task == "sft":  # the math set has its own validation and test splits
        cfg.update(task="sft", eval_batch_size=setup.eval_batch_size,
                   sft={"eval_split": "test" if task.phase == "test" else "validation",
                        "eval_limit": None})  # fmt: skip
        validation = None
    match = cell.budget if cell.method in MATCHED else None  # E²LoRA's r, from the statistics
    payload = json.dumps({"config": cfg, "validation": validation, "match": match})
    if source_of(cell):  # the truncation control: the source's run on this seed, cut, scored
        source = work / Task(replace(cell, key=source_of(cell)), seed).name
        payload = json.dumps({"truncate": {"source": str(source), "r": cell.r, "output": str(out)}})
    if setup.isolate:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
        threads = ["--threads", str(setup.threads)] if setup.threads else []
        if setup.threads:  # OpenMP spin-waits badly on a shared machine with too many threads
            env["OMP_NUM_THREADS"] = str(setup.threads)
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", payload, *threads],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"{task.name} failed (exit {proc.returncode}):\n{tail}")
    else:
        worker(payload, setup.threads)
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    split = json.loads((out / "bench.json").read_text(encoding="utf-8"))
    held = "val_examples" if task.phase != "test" else "test_examples"
    skip = ("config", "method", "seed", "lr", "test_examples", "options")
    return {
        "config": setup.name,
        "cell": cell.key,
        "label": cell.label,
        "group": cell.group,
        "method": cell.method,
        "r": m.get("config", {}).get("r", cell.r),  # E²LoRA's matched rank may differ
        "options": json.dumps(cfg["options"], sort_keys=True),
        "phase": task.phase,
        "lr": ql.lr_text(lr),
        "seed": seed,
        **{k: m.get(k) for k in RUN_FIELDS if k in m and k not in skip},
        "train_loss": m.get("final_train_loss"),
        held: split["held_out"],
        "heldout_majority": split["majority"],
        "flex_ranks_moved": flex_ranks_moved(out, cell.r) if cell.method == "flexlora" else "",
        "stats_reused": bool(stats),
    }


# -- the grid ---------------------------------------------------------------------------------
def run_grid(
    setup: Setup,
    folder: Path,
    work: Path,
    header: str,
    progress: bool = True,
    jobs: int = 1,
    sweep: bool = False,
) -> list[dict]:
    """Run every unfinished run of ``setup`` (or of its LR sweep), ``jobs`` at a time.

    Returns runs.csv's rows; RuntimeError listing the runs that failed (the others finish).
    """
    import torch

    names = setup.sweep_cells if sweep else (setup.only_cells or setup.cells)
    cells = [c for c in CELLS if c.key in names]
    folder.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)

    def record(task: Task, lr: float, stats: str | None, row: dict) -> None:
        if probes(task.cell, stats):  # keep the statistics outside the run folder
            dst = work / f"stats-{task.stats_key}.safetensors"
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
            shutil.copyfile(work / task.name / "stats.safetensors", tmp)
            os.replace(tmp, dst)  # a waiting process never sees half a file
        info = common.machine_info(torch.device(row.get("device") or "cpu"))
        info["torch_threads"] = str(setup.threads or torch.get_num_threads())
        row = {**row, "config": setup.name, "finished": info.pop("date")}
        row["machine"] = common.describe({**info, "date": ""}).rstrip("; ")
        common.append_row(folder / "runs.csv", row, RUN_FIELDS)

    def lr_for(rows: Sequence[Mapping[str, str]], task: Task) -> float | None:
        if task.phase != "test":
            return task.lr
        if source_of(task.cell):  # waits for the source's test run on the same seed
            src, seed = source_of(task.cell), task.seed
            done = [r for r in ql.test_rows(rows) if r["cell"] == src and int(r["seed"]) == seed]
            return float(done[0]["lr"]) if done else None
        if not setup.lrs:
            return setup.lr
        key = lr_source(task.cell) or task.cell.key
        return ql.chosen_lr(rows, key, setup.lrs, setup.select_seed, setup.edge_steps)

    def extra(rows: Sequence[Mapping[str, str]]) -> list[Task]:
        if sweep or not setup.lrs:
            return []
        return [
            Task(c, setup.select_seed, "select", lr)
            for c in cells
            if selects(c)
            for lr in ql.needed_lrs(rows, c.key, setup.lrs, setup.select_seed, setup.edge_steps)
            if lr not in setup.lrs
        ]

    hooks = Hooks(
        run=lambda task, lr, stats: run_cell(setup, task, lr, work, stats),
        record=record,
        write=lambda failed: summarize_grid(folder, setup, header, failed),
        needs_stats=lambda task: task.cell.method not in PROBE_FREE,
        lr_for=lr_for,
        extra=extra,
        current=lambda rows: ql.current_rows(
            rows, setup.lrs, setup.select_seed, setup.edge_steps, aliases(cells)
        ),
    )
    Grid(folder, work, grid_tasks(setup, cells, sweep), hooks).run(jobs, progress)
    return common.read_rows(folder / "runs.csv")


def summarize_grid(folder: Path, setup: Setup, header: str, failed: Sequence[str] = ()) -> None:
    """Rewrite every summary file of ``folder`` from its runs.csv."""
    cells = [c for c in CELLS if c.key in setup.cells]
    sweep = [c for c in CELLS if c.key in setup.sweep_cells]
    qs.write_summary(folder, setup, cells, header, failed, sweep)


def smoke_frontier(setup: Setup) -> Setup:
    """A frontier configuration's smoke: tiny model, 1 seed, 2 steps, a few of its cells (the
    LoRA ranks, a peer at each budget, the truncation control at both)."""
    cells = tuple(k for k in SMOKE_FRONTIER if k in setup.cells)
    length = 96 if setup.task == "sft" else 16  # the math set's chat-template rows need 88
    return Setup(f"smoke-{setup.name}", None, None, (0,), epochs=1, limit=None, max_length=length,
                 batch_size=8, eval_batch_size=8, probe_steps=2, max_steps=2, lrs=(2e-3, 5e-3),
                 cells=cells, isolate=False, edge_steps=0, task=setup.task,
                 frontier=True)  # fmt: skip


def check_sources(setup: Setup) -> None:
    """ValueError when a truncation cell's source (LoRA r=16), or the cell whose learning rate a
    cell runs at (``Cell.lr_of``), is not a cell of the grid."""
    run = setup.only_cells or setup.cells
    for c in CELLS:
        if c.key in run and lr_source(c) and lr_source(c) not in run:
            how = "cuts the runs of" if source_of(c) else "runs at the learning rate of"
            raise ValueError(f"cell {c.key} {how} {lr_source(c)}, which is not in --cells; add it")


def setup_from_args(args: argparse.Namespace) -> Setup:
    """The configuration the arguments ask for (the smoke one still without model and data)."""
    keys = {c.key for c in CELLS}
    if args.smoke and CONFIGS[args.config].frontier:
        setup = smoke_frontier(CONFIGS[args.config])
    elif args.smoke:
        setup = Setup("smoke", None, None, (0,), epochs=1, limit=None, max_length=16,
                      batch_size=8, probe_steps=2, max_steps=2, lrs=(2e-3, 5e-3),
                      cells=SMOKE_CELLS, sweep_lrs=(1e-3, 2e-3, 5e-3), sweep_steps=3,
                      sweep_cells=("lora-r8",), isolate=False, edge_steps=0)  # fmt: skip
    else:
        setup = CONFIGS[args.config]
        if args.model:
            name = Path(args.model).name if args.model != "smollm2" else "smollm2"
            setup = replace(setup, name=f"{setup.name}-{name}", model=args.model)
    if args.cells:
        chosen = tuple(k.strip() for k in args.cells.split(",") if k.strip())
        unknown = sorted(set(chosen) - keys)
        if unknown:
            raise ValueError(f"unknown cell(s) {unknown}; choose from {', '.join(sorted(keys))}")
        if args.lr_sweep:
            setup = replace(setup, sweep_cells=chosen)
        elif set(chosen) <= set(setup.cells) and args.lr is None:
            setup = replace(setup, only_cells=chosen)  # run a few now; the tables keep the grid
        else:  # other cells, or one --lr for all: a grid of its own, only they are tabled
            setup = replace(setup, cells=chosen)
    check_sources(setup)
    if args.lr is not None:
        if not args.lr > 0:
            raise ValueError(f"--lr must be a positive number, got {args.lr}")
        setup = replace(setup, lr=args.lr, lrs=())
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        setup = replace(setup, threads=args.threads)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs > 1:  # in-process runs would share torch's global RNG and thread pool
        setup = replace(setup, isolate=True)
    if args.seeds:
        seeds = tuple(int(s) for s in args.seeds.split(","))
        if args.smoke or not set(seeds) <= set(setup.seeds):
            # Seeds outside the configuration's make a different grid: count them in the tables.
            setup = replace(setup, seeds=seeds)
        else:
            setup = replace(setup, only_seeds=seeds)
    return setup


def command_line(args: argparse.Namespace) -> str:
    """The command that regenerates (resumes) what ``args`` runs, for the tables' headers."""
    cmd = "python bench/quality/quality.py " + (
        "--smoke" + (f" --config {args.config}" if CONFIGS[args.config].frontier else "")
        if args.smoke
        else f"--config {args.config}" + (f" --model {args.model}" if args.model else "")
    )
    cmd += " --lr-sweep" if args.lr_sweep else ""
    cmd += f" --lr {args.lr:g}" if args.lr is not None else ""
    cmd += f" --threads {args.threads}" if args.threads else ""
    cmd += f" --jobs {args.jobs}" if args.jobs > 1 else ""
    return cmd + (f" --cells {args.cells}" if args.cells else "")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    ap.add_argument("--model", default=None, help="smollm2, or a local model folder")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 1 seed, few steps")
    ap.add_argument(
        "--lr-sweep",
        action="store_true",
        help="validation accuracy of the sweep cells (--cells, default LoRA r=8 and RaLoRA r=8) "
        "at each learning rate of the configuration's sweep, instead of the grid",
    )
    ap.add_argument("--results", default=str(RESULTS), help="folder for <config>/ outputs")
    ap.add_argument("--work", default=None, help="folder for run folders (default runs/…)")
    ap.add_argument(
        "--cells",
        default=None,
        help="comma-separated cell keys to run now (default: all); cells of the configuration "
        "keep its tables whole, others (or any with --lr) make a grid of their own",
    )
    ap.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds to run the test runs of now (default: the config's)",
    )
    ap.add_argument(
        "--lr",
        type=float,
        default=None,
        help="run every cell at this learning rate (no selection; a grid of its own: use "
        "another --results)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    ap.add_argument(
        "--jobs", type=int, default=1, help="runs at a time, each its own process (default 1)"
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument(
        "--summary-only",
        action="store_true",
        help="rewrite the tables from runs.csv, train nothing",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse arguments, run (the rest of) the grid, print the table; returns the results folder."""
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.threads)
        return Path(".")
    setup = setup_from_args(args)
    tmp = None
    if args.smoke:
        tmp = Path(tempfile.mkdtemp(prefix="entrolora-bench-smoke-"))
        model, data = smoke_assets(tmp, setup.task)
        setup = replace(setup, model=model, data=data)
    folder = Path(args.results) / setup.name
    work = Path(args.work) if args.work else (tmp or WORK) / setup.name
    shown = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
    header = (
        f"Regenerate: `{command_line(args)}` (resumes; delete `{shown}/runs.csv` to start over)."
    )
    try:
        if args.summary_only:
            folder.mkdir(parents=True, exist_ok=True)
            summarize_grid(folder, setup, header)
        else:
            run_grid(setup, folder, work, header, not args.quiet, args.jobs, args.lr_sweep)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    shown = ("table.md", "frontier.md" if setup.frontier else "claims.md")
    for name in ("lr_sweep.md",) if args.lr_sweep else shown:
        if (folder / name).is_file():
            print((folder / name).read_text(encoding="utf-8"))
    return folder


if __name__ == "__main__":
    main()

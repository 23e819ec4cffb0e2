"""The scheduler of ``bench/quality/quality.py``: which run starts next, in this or another process.

A grid is a list of ``Task``s (a cell on a seed, ``select`` at a given learning rate or
``test`` at the cell's chosen one). ``Grid`` runs them ``jobs`` at a time: a test run starts once
its cell's learning rate is chosen, a run that needs its seed's probe statistics waits while
another run computes them, and every run in flight holds a claim file, so that several
processes (e.g. an LR sweep and the grid, or one runner per seed) can share one results folder
without running anything twice. Finished runs are the rows of runs.csv; nothing else is state.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import quality_lr as ql

import common

POLL_S = 15.0  # how often a waiting runner looks for runs another process finished


@dataclass(frozen=True)
class Task:
    """One run: a cell on a seed, in a phase of ``quality_lr.PHASES``: ``select`` and ``sweep``
    (validation, at ``lr``) or ``test`` (at the cell's chosen lr)."""

    cell: Any  # quality.Cell
    seed: int
    phase: str = "test"
    lr: float | None = None  # select and sweep runs; a test run's lr is chosen when it starts

    @property
    def key(self) -> tuple:
        base = (self.cell.key, self.seed, self.phase)
        return base + ((ql.lr_text(self.lr),) if self.phase != "test" else ())

    @property
    def name(self) -> str:
        """The run folder's name (and the claim file's)."""
        tail = f"-{self.phase}-lr{ql.lr_text(self.lr)}" if self.phase != "test" else ""
        return f"{self.cell.key}-seed{self.seed}{tail}"

    @property
    def stats_key(self) -> str:
        """Runs that train on the same rows (a seed's training split, with or without its
        validation slice) share their probe statistics."""
        key = f"seed{self.seed}" + ("-select" if self.phase != "test" else "")
        # auto probes every linear layer (issue 32), the other planners their default targets:
        # a statistics file fixes the modules a reusing run adapts, so the two never share one
        return key + ("-all-linear" if self.cell.method == "auto" else "")


def row_key(row: Mapping[str, str]) -> tuple:
    """The ``Task.key`` of a runs.csv row."""
    phase = ql.phase(row)
    base = (row["cell"], int(row["seed"]), phase)
    return base + ((ql.lr_text(float(row["lr"])),) if phase != "test" else ())


def grid_tasks(setup: Any, cells: Sequence[Any], sweep: bool = False) -> list[Task]:
    """The runs of a grid in the order they should start.

    Cell by cell: a cell's learning-rate selection runs, then its test runs on every seed (they
    start once its learning rate is chosen; meanwhile the next cell's selection runs go), so
    that a partial grid holds whole cells and the claims between them. With ``sweep``: only the
    sweep runs of ``cells`` (validation, at ``setup.sweep_lrs``).
    """
    if sweep:
        return [Task(c, setup.select_seed, "sweep", lr) for c in cells for lr in setup.sweep_lrs]
    seeds = setup.only_seeds if setup.only_seeds is not None else setup.seeds
    return [
        task
        for c in cells
        for task in (
            *(Task(c, setup.select_seed, "select", lr) for lr in setup.lrs if selects(c)),
            *(Task(c, s) for s in seeds),
        )
    ]


def source_of(cell: Any) -> str | None:
    """The cell whose trained runs ``cell`` reuses instead of training (the truncation control
    evaluates LoRA r=16's adapter): it has no learning rate of its own and runs at the source's."""
    return cell.options.get("source") if cell.method == "truncate" else None


def lr_source(cell: Any) -> str | None:
    """The cell whose learning rate ``cell`` runs at instead of choosing its own: the truncation
    control's source, or ``Cell.lr_of`` (a twin compared with its cell at one rate, paired)."""
    return source_of(cell) or cell.lr_of


def aliases(cells: Sequence[Any]) -> dict[str, str]:
    """``{cell: the cell whose learning rate it runs at}`` (``lr_source``)."""
    return {c.key: src for c in cells if (src := lr_source(c))}


def selects(cell: Any) -> bool:
    """Whether ``cell`` chooses its own learning rate (validation runs)."""
    return lr_source(cell) is None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class Claims:
    """Claim files in ``work/.claims``: which runs are in flight, in this or another process.

    A claim names its process and, for a run that probes, the statistics it computes (so that
    the other runs of that seed wait for them instead of probing again). A claim whose process
    has died is stale and removed.
    """

    def __init__(self, work: Path):
        self.folder = work / ".claims"
        self.folder.mkdir(parents=True, exist_ok=True)

    def live(self) -> dict[str, str | None]:
        """``{run name: statistics key it probes or None}`` of the runs in flight."""
        out = {}
        for path in self.folder.glob("*.json"):
            try:
                info = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue  # being written or removed right now
            if _pid_alive(int(info["pid"])):
                out[path.stem] = info.get("probe")
            else:
                path.unlink(missing_ok=True)
        return out

    def take(self, name: str, probe: str | None) -> bool:
        """Claim ``name``; False when another claim holds it."""
        try:
            fd = os.open(self.folder / f"{name}.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "probe": probe}, f)
        return True

    def release(self, name: str) -> None:
        (self.folder / f"{name}.json").unlink(missing_ok=True)


@dataclass
class Hooks:
    """What ``Grid`` calls: ``run(task, lr, stats) -> row`` (RuntimeError on failure),
    ``record(task, lr, stats, row)`` (append the row, keep the statistics), ``write(failed)``
    (rewrite the summary), ``needs_stats(task)``, ``lr_for(rows, task)`` (None: not chosen
    yet)."""

    run: Callable[[Task, float, str | None], dict]
    record: Callable[[Task, float, str | None, dict], None]
    write: Callable[[Sequence[str]], None]
    needs_stats: Callable[[Task], bool]
    lr_for: Callable[[Sequence[Mapping[str, str]], Task], float | None]
    # validation runs beyond the grid's edge that a learning-rate choice now waits for
    extra: Callable[[Sequence[Mapping[str, str]]], list[Task]] = lambda rows: []
    # runs.csv's rows that count as done (test runs at a superseded learning rate do not)
    current: Callable[[Sequence[Mapping[str, str]]], list] = list


class Grid:
    """Runs ``tasks`` ``jobs`` at a time; after each, records its row and rewrites the summary."""

    def __init__(self, folder: Path, work: Path, tasks: list[Task], hooks: Hooks):
        self.folder, self.work, self.todo, self.hooks = folder, work, list(tasks), hooks
        self.claims = Claims(work)
        self.failed: list[str] = []
        self.lock = threading.Condition()
        self.say: Callable[[str], Any] = lambda m: print(m, flush=True)
        self.bar: Any = None

    def stats_path(self, key: str) -> Path:
        return self.work / f"stats-{key}.safetensors"

    def take(self) -> tuple[Task, float, str | None] | None:
        """The next run that can start, its lr and statistics file; None when none is left."""
        with self.lock:
            while True:
                rows = self.hooks.current(common.read_rows(self.folder / "runs.csv"))
                finished = {row_key(r) for r in rows}
                self.todo = [t for t in self.todo if t.key not in finished]
                queued = {t.key for t in self.todo}
                self.todo[:0] = [
                    t for t in self.hooks.extra(rows) if t.key not in finished | queued
                ]
                if not self.todo:
                    return None
                live = self.claims.live()
                probing = {p for p in live.values() if p}
                for i, task in enumerate(self.todo):
                    lr = self.hooks.lr_for(rows, task)
                    if task.name in live or lr is None:
                        continue
                    needs = self.hooks.needs_stats(task)
                    stats = self.stats_path(task.stats_key)
                    probe = task.stats_key if needs and not stats.is_file() else None
                    if probe in probing or not self.claims.take(task.name, probe):
                        continue
                    del self.todo[i]
                    return task, lr, (str(stats) if needs and probe is None else None)
                if not live:  # nothing runs anywhere, nothing can start: a selection run failed
                    self.failed += [f"{t.name} (no learning rate chosen)" for t in self.todo]
                    self.todo.clear()
                    return None
                self.lock.wait(timeout=POLL_S)

    def finish(self, task: Task, lr: float, stats: str | None, row: dict | None) -> None:
        with self.lock:
            try:
                if row is None:
                    self.failed.append(task.name)
                else:
                    self.hooks.record(task, lr, stats, row)  # before the claim goes
                    self.say(
                        f"{task.name} (lr {ql.lr_text(lr)}): accuracy "
                        f"{100 * float(row['accuracy']):.2f}%, train {float(row['train_s']):.1f} s"
                    )
            finally:
                self.claims.release(task.name)
            self.hooks.write(self.failed)
            if self.bar is not None:
                self.bar.update(1)
            self.lock.notify_all()

    def runner(self) -> None:
        while (job := self.take()) is not None:
            task, lr, stats = job
            try:
                row = self.hooks.run(task, lr, stats)
            except RuntimeError as e:  # one broken method must not stop the grid
                self.say(str(e))
                row = None
            self.finish(task, lr, stats, row)

    def run(self, jobs: int = 1, progress: bool = True) -> None:
        """Run every task; RuntimeError listing the runs that failed (the others finish)."""
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(self.todo), unit="run")
            self.say = self.bar.write
        self.hooks.write(self.failed)
        try:
            if jobs == 1:
                self.runner()
            else:
                with ThreadPoolExecutor(jobs) as pool:
                    for f in [pool.submit(self.runner) for _ in range(jobs)]:
                        f.result()
        finally:
            if self.bar is not None:
                self.bar.close()
        if self.failed:
            raise RuntimeError(
                f"{len(self.failed)} run(s) failed (rerun to retry): {', '.join(self.failed)}"
            )

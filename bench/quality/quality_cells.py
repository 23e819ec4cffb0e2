"""The catalogue of ``bench/quality/quality.py``: its cells (a method with its options), the
frontier's ranks and contenders (issue 31), and the configurations (``Setup``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import quality_lr as ql


@dataclass(frozen=True)
class Cell:
    """One row of the table: a method, its rank and options, and the comparison it belongs to."""

    key: str  # stable id in runs.csv
    label: str
    method: str
    r: int = 8
    options: Mapping[str, Any] = field(default_factory=dict)
    group: str = "methods"
    budget: int | None = None  # frontier contenders: the LoRA rank whose parameter count they match
    lr_of: str | None = None  # runs at this cell's chosen learning rate, choosing none of its own
    targets: str | None = None  # --target-modules (None: the method's default targets)


CELLS: tuple[Cell, ...] = (
    # Ordered by the claims they test first, so that a partial grid answers the main ones.
    Cell("lora-r8", "LoRA r=8", "lora", 8),
    Cell("e2lora-r8", "E²LoRA r=8", "e2lora", 8),
    Cell("sharelora-r8", "ShareLoRA r=8", "sharelora", 8),
    Cell("e2sharelora-r8", "E²ShareLoRA r=8", "e2sharelora", 8),
    Cell("ralora-r8", "RaLoRA r=8", "ralora", 8),
    Cell("flexlora-r8", "FlexLoRA r=8 (capacity 2r)", "flexlora", 8),
    Cell("peft-adalora-r8", "peft AdaLoRA 12→8", "adalora", 8, {}, "peft"),
    Cell("lora-r4", "LoRA r=4", "lora", 4),
    Cell("ralora-pro-r8", "RaLoRA-Pro r_ref=8", "ralora-pro", 8),
    Cell("peft-lora-r8", "peft LoRA r=8", "peft-lora", 8, {}, "peft"),
    # Issue 14: the planners' signal statistics (their default) against the papers' raw ones.
    Cell("e2lora-r8-raw", "E²LoRA r=8 raw statistics", "e2lora", 8, {"statistics": "raw"},
         "stats"),
    Cell("ralora-r8-raw", "RaLoRA r=8 raw statistics", "ralora", 8, {"statistics": "raw"},
         "stats"),
    Cell("e2lora-r8-layers", "E²LoRA r=8 budget=layers", "e2lora", 8, {"budget": "layers"}),
    Cell("peft-dora-r8", "peft DoRA r=8", "dora", 8, {}, "peft"),
    Cell("peft-vera-r256", "peft VeRA r=256", "vera", 256, {}, "peft"),
    # E²LoRA Table 4 ablations (full method = e2lora-r8: LSS + HRA, RMI similarity).
    Cell("e2lora-lss-only", "E²LoRA LSS only", "e2lora", 8, {"allocation": "uniform"}, "table4"),
    Cell("e2lora-hra-only", "E²LoRA HRA only", "e2lora", 8, {"sharing": "none"}, "table4"),
    Cell("e2lora-cosine", "E²LoRA sim=cosine", "e2lora", 8, {"similarity": "cosine"}, "table4"),
    Cell("e2lora-l1", "E²LoRA sim=L1", "e2lora", 8, {"similarity": "l1"}, "table4"),
    Cell("e2lora-l2", "E²LoRA sim=L2", "e2lora", 8, {"similarity": "l2"}, "table4"),
    Cell("e2lora-kl", "E²LoRA sim=KL", "e2lora", 8, {"similarity": "kl"}, "table4"),
    # E²LoRA Table 5 (parameter-matched): e2lora-r8 vs lora-r4 above, and r=16 vs lora-r8.
    Cell("e2lora-r16", "E²LoRA r=16", "e2lora", 16, {}, "table5"),
    # Issue 33: Algorithm 2 without the significance gate (e2lora-r8 is gated, the default).
    Cell("e2lora-r8-greedy", "E²LoRA r=8 greedy boundaries", "e2lora", 8,
         {"boundaries": "greedy"}, "gate"),
)  # fmt: skip
FRONTIER_RANKS = (1, 2, 4, 8, 16, 32)
BUDGETS = (2, 8)
# auto's defaults are power=1, init="lora"; the frontier measures the other three pairs too
AUTO_VARIANTS = (("p2", {"power": 2}), ("grad", {"init": "gradient"}),
                 ("p2-grad", {"power": 2, "init": "gradient"}))  # fmt: skip


def frontier_cells() -> tuple[Cell, ...]:
    """Issue 31: uniform LoRA at every rank (the frontier) and the contenders at the parameter
    counts of LoRA r=2 and r=8. Budget matching (docs/benchmarks.md, "Capacity frontier"):
    RaLoRA, FlexLoRA, EVA, LoRA-GA and PiSSA count r·(d_in + d_out) a module like LoRA, so they
    run at the budget's r; peft AdaLoRA's count is its initial rank's, so it starts at the
    budget's r (init_r) and prunes to two thirds of it; E²LoRA shares factors, so its rank is
    the one whose plan on the seed's statistics comes nearest the count
    (``quality_run.matched_rank``; 2r, about right on MiniLM, if it has to probe itself);
    auto takes the budget itself (like-lora=r); the truncation control cuts the LoRA r=16 run
    to the count. Every run records its rank and its actual count."""
    lora = {4: "lora-r4", 8: "lora-r8"}  # already cells of the cpu grid
    cells = [
        Cell(f"lora-r{r}", f"LoRA r={r}", "lora", r, {}, "frontier")
        for r in FRONTIER_RANKS
        if r not in lora
    ]
    from entrolora.job.config import METHODS

    for b in BUDGETS:
        cells += [
            # RaLoRA first: it probes the seed, and E²LoRA's rank is matched on those statistics
            Cell(f"ralora-at-r{b}", f"RaLoRA r={b}", "ralora", b, {}, "contender", b),
            Cell(f"e2lora-at-r{b}", f"E²LoRA at r={b}'s size", "e2lora", 2 * b, {}, "contender", b),
            Cell(f"flexlora-at-r{b}", f"FlexLoRA r={b}", "flexlora", b, {}, "contender", b),
            Cell(f"adalora-at-r{b}", f"peft AdaLoRA {b}→{max(1, 2 * b // 3)}", "adalora",
                 max(1, 2 * b // 3), {"init_r": b}, "peft", b),
            Cell(f"eva-at-r{b}", f"peft EVA r={b}", "eva", b, {}, "peft", b),
            Cell(f"lora-ga-at-r{b}", f"peft LoRA-GA r={b}", "lora-ga", b, {}, "peft", b),
            Cell(f"pissa-at-r{b}", f"peft PiSSA r={b}", "pissa", b, {}, "peft", b),
            Cell(f"truncate-at-r{b}", f"LoRA r=16 cut to r={b}'s count", "truncate", b,
                 {"source": "lora-r16"}, "control", b),
        ]  # fmt: skip
        if "auto" in METHODS:  # issue 32's planner, once merged
            cells.append(Cell(f"auto-at-r{b}", f"auto like-lora={b}", "auto", 16,
                              {"budget": f"like-lora={b}"}, "contender", b))  # fmt: skip
    if "auto" in METHODS:  # issue 32, item 5: its other powers and inits, after the rest
        for b in BUDGETS:
            for tag, opts in AUTO_VARIANTS:
                options = {"budget": f"like-lora={b}", **opts}
                key, label = f"auto-{tag}-at-r{b}", f"auto like-lora={b} {tag}"
                cells.append(Cell(key, label, "auto", 16, options, "contender", b))
    # Issue 33: the paper's greedy boundaries against the gated default, paired at the gated
    # cell's learning rate (as the cpu-gate run did), its rank matched like the gated cell's
    cells.append(Cell("e2lora-at-r8-greedy", "E²LoRA at r=8's size, greedy boundaries", "e2lora",
                      16, {"boundaries": "greedy"}, "gate", 8, lr_of="e2lora-at-r8"))  # fmt: skip
    # Uniform LoRA on every linear layer of the stack (peft's target_modules="all-linear", a
    # common user choice) at half the budget's rank: auto's candidate modules without auto's
    # allocation (1.125× the budget's count on MiniLM, 1.33× on SmolLM2; the table measures it
    # at its own count). It separates "attention or MLP" from "auto's ranks" in auto's distance.
    cells += [Cell(f"lora-all-at-r{b}", f"LoRA all-linear r={b // 2}", "lora", b // 2, {},
                   "targets", b, targets="all-linear") for b in BUDGETS]  # fmt: skip
    return tuple(cells)


BASE_CELLS = CELLS  # the grids before issue 31 (cpu, cpu-quick, gpu)
CELLS = BASE_CELLS + frontier_cells()
MAIN_CELLS = tuple(c.key for c in CELLS[:12])  # the issue-15 grid: main claims + issue 14
QUICK_CELLS = tuple(c.key for c in BASE_CELLS if not c.key.endswith("-raw") and c.group != "gate")
SMOKE_CELLS = ("lora-r8", "e2lora-r8", "peft-lora-r8")
LR_GRID = (5e-4, 1e-3, 2e-3, 5e-3)
FRONTIER_KEYS = tuple(f"lora-r{r}" for r in FRONTIER_RANKS)
CONTENDERS = tuple(c.key for c in CELLS if c.budget)
RT_FRONTIER = (*FRONTIER_KEYS[:5], *CONTENDERS)  # r = 1…16
MATH_FRONTIER = (*FRONTIER_KEYS, *CONTENDERS)  # r = 1…32
SMOKE_FRONTIER = ("lora-r1", "lora-r2", "lora-r4", "lora-r16", "ralora-at-r2", "e2lora-at-r2",
                  "eva-at-r2", "truncate-at-r2", "pissa-at-r8", "truncate-at-r8", "e2lora-at-r8",
                  "e2lora-at-r8-greedy", "lora-all-at-r2")  # fmt: skip
SWEEP_LRS = (1e-4, 3e-4, 1e-3, 2e-3, 5e-3)


@dataclass(frozen=True)
class Setup:
    """Training settings shared by every cell of a configuration."""

    name: str
    model: str | None
    data: str | None
    seeds: tuple[int, ...]
    epochs: int
    limit: int | None
    max_length: int
    batch_size: int = 32
    lr: float = 2e-3  # every cell's learning rate when ``lrs`` is empty
    lrs: tuple[float, ...] = ()  # the grid each cell chooses its learning rate from
    select_seed: int = 0  # the seed whose validation slice chooses the learning rate
    edge_steps: int = ql.EDGE_STEPS  # validation runs beyond an end of ``lrs`` the best sits at
    validation_fraction: float = 0.15  # of the training split, by film
    probe_steps: int = 64
    max_steps: int | None = None
    cells: tuple[str, ...] = tuple(c.key for c in BASE_CELLS)
    sweep_lrs: tuple[float, ...] = SWEEP_LRS  # --lr-sweep
    sweep_steps: int | None = None  # the sweep's max_steps (None: ``max_steps``)
    sweep_cells: tuple[str, ...] = ("lora-r8", "ralora-r8")
    isolate: bool = True  # one process per run, so that a CPU peak RSS is that run's own
    threads: int | None = None  # torch CPU threads per run (None: torch's default)
    only_seeds: tuple[int, ...] | None = None  # run just these now (tables still count ``seeds``)
    only_cells: tuple[str, ...] | None = None  # run just these now (tables still show ``cells``)
    task: str = "classify"  # "sft": the shipped math set, validation/test splits of its own
    eval_batch_size: int = 64
    frontier: bool = False  # the capacity-frontier summary (frontier.py) beside the tables


CONFIGS = {
    # All 12,808 snippets (≈ 10,250 train / 2,560 test a seed; the selection runs train on
    # ≈ 8,700 and validate on ≈ 1,570), 200 steps of 16 (3,200 examples, a third of an epoch;
    # the sweep 1,000, hence 2 epochs at most, at four rates from 1e-4 to 5e-3: a run is ~15
    # core-minutes), length 80 (the longest snippet is 78 MiniLM tokens), each cell at its own
    # lr. 86 runs of about 166 s: 2 h 04 min with --jobs 2 --threads 1 on this 2-core
    # machine (docs/benchmarks.md, "Run time").
    "cpu": Setup("cpu", None, None, (0, 1, 2), epochs=2, limit=None, max_length=80,
                 batch_size=16, max_steps=200, lrs=LR_GRID, cells=MAIN_CELLS,
                 sweep_lrs=(1e-4, 3e-4, 1e-3, 5e-3), sweep_steps=1000),
    # The grid before learning-rate selection: 2,000 snippets, 50 steps, lr 2e-3 for every
    # cell (≈ 70 s a run on one core, 60 runs under 40 min with --jobs 2 --threads 1).
    "cpu-quick": Setup("cpu-quick", None, None, (0, 1, 2), epochs=1, limit=2000, max_length=64,
                       probe_steps=16, cells=QUICK_CELLS),
    "gpu": Setup("gpu", None, None, (0, 1, 2), epochs=3, limit=None, max_length=80,
                 lrs=LR_GRID),
    # Issue 31: the capacity frontier on Rotten Tomatoes, `cpu`'s data, steps and lr grid; LoRA
    # r = 1…16 and every contender at LoRA r=2's and r=8's parameter counts.
    "rt-lowbudget": Setup("rt-lowbudget", None, None, (0, 1, 2), epochs=2, limit=None,
                          max_length=80, batch_size=16, max_steps=200, lrs=LR_GRID,
                          cells=RT_FRONTIER, frontier=True),
    # Issue 31 on the shipped math set (--task sft), SmolLM2-135M: lr chosen on the set's
    # validation split, scored on its test split (exact match; answer loss second). Sized for
    # ~12 h of this 2-core machine with --jobs 2 --threads 1 (docs/benchmarks.md, "The capacity
    # frontier", Sizing): two seeds, two learning rates a cell (+ one beyond an edge), 72 steps
    # of 16 (a step ≈ 8.1 CPU-s, a test-split evaluation ≈ 265 CPU-s): ≈ 10.1 h, 11.1 h with
    # the auto cells, ≈ 14 h with auto's three other power/init pairs (issue 32, item 5).
    # Measured: ≈ 11 h for issue 31's 24 cells, ≈ 15 h for all 33 (with two rates the best is
    # always at an edge, so every cell makes three validation runs).
    "math-cpu": Setup("math-cpu", "smollm2", None, (0, 1), epochs=1, limit=None, max_length=96,
                      batch_size=16, eval_batch_size=32, max_steps=72, lrs=(1e-3, 4e-3),
                      edge_steps=1, probe_steps=8, cells=MATH_FRONTIER, task="sft",
                      frontier=True),
}  # fmt: skip

"""When may FlexLoRA start moving rank? Accuracy and importance quality against the warm-up.

    python bench/flexlora/flexlora_warmup.py                      # quality.py's `cpu-quick` setting
    python bench/flexlora/flexlora_warmup.py --fractions 0.1,0.3 --seeds 0
    python bench/flexlora/flexlora_warmup.py --smoke                 # tiny random BERT and CSV (CI)

For each warm-up fraction f, FlexLoRA (r=8, capacity 2r) is trained by ``train_run`` with
``t_warmup = round(f·T)`` (``t_final`` and ``interval`` at their defaults for that warm-up) on
the 2,000-snippet setting of the issue-12 table (``bench/quality/quality.py --config cpu-quick``:
MiniLM, Rotten Tomatoes split by film, 1 epoch = 50 steps, batch 32, lr 2e-3). Per seed, one
more run with ``b0 = 0`` (no move at all) gives the *reference importance*: eq. 3 on each
module's update at the last step of an undisturbed run. Reported per fraction, over seeds:

- accuracy;
- *importance agreement*: Spearman correlation between the importance the controller read at
  its first adjustment step (where it moves the most: b(t_warmup) = b₀) and the reference —
  near 0 when the update is still noise, near 1 when it already shows the structure it ends with;
- the reversal rate (share of a module's rank changes that undo its previous one), the
  directions moved and the modules ending at a rank ≠ r₀.

The controller's importance is read by wrapping ``FlexLoRA.step`` (one extra snapshot at the
first adjustment and the last step). Writes ``<out>/warmup.md`` and ``<out>/warmup.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
ROOT = Path(__file__).resolve().parents[2]


def rank_changes(history: list, r0: int) -> tuple[int, int, int]:
    """``(directions moved, rank changes, changes that undo the module's previous change)``.

    ``history`` is FlexLoRA's ``[(step, {module: rank})]`` (its first entry is already after the
    first adjustment); every module starts at ``r0``.
    """
    if not history:
        return 0, 0, 0
    names = list(history[0][1])
    states = [dict.fromkeys(names, r0)] + [ranks for _, ranks in history]
    moved = changes = undone = 0
    for name in names:
        last = None
        for a, b in zip(states, states[1:]):
            d = b[name] - a[name]
            if d == 0:
                continue
            moved += max(d, 0)
            changes += 1
            undone += last is not None and (d > 0) != (last > 0)
            last = d
    return moved, changes, undone


def spearman(a: dict[str, float], b: dict[str, float]) -> float:
    """Spearman's ρ of two ``{module: value}`` maps (average ranks for ties)."""
    import numpy as np

    def ranks(v: dict[str, float]) -> np.ndarray:
        x = np.array([v[k] for k in sorted(a)])
        order = x.argsort(kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for val in np.unique(x):  # ties: their mean rank
            r[x == val] = r[x == val].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


READS: list[tuple[int, dict[str, float]]] = []
EVERY_STEP = [False]  # the reference run reads the importance at every step
AGREEMENT_AT = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)  # fractions of T


def record_importance() -> None:
    """Wrap ``FlexLoRA.step``: note the importance at the first adjustment and the last step."""
    from entrolora.flex import FlexLoRA

    if getattr(FlexLoRA.step, "_recording", False):
        return
    original = FlexLoRA.step

    def step(self, t, optimizer):
        first = self.schedule.is_adjustment_step(t) and not self.history
        if EVERY_STEP[0] or first or t == self.schedule.total_steps - 1:
            READS.append((t, self.importance()))
        return original(self, t, optimizer)

    step._recording = True
    FlexLoRA.step = step


def settings(args: argparse.Namespace, work: Path):
    """``(TrainConfig without t_warmup, total steps T)``."""
    from entrolora.data import datasets as D
    from entrolora.job import TrainConfig, load_splits

    cfg = TrainConfig(
        method="flexlora", limit=2000, epochs=1, batch_size=32, max_length=64, lr=args.lr,
        probe_steps=16, progress=False, report=False, output=str(work / "run"),
    )  # fmt: skip
    if args.smoke:
        from quality import smoke_assets

        cfg.model, cfg.data = smoke_assets(work)
        cfg.limit, cfg.max_length, cfg.batch_size, cfg.epochs, cfg.lr = None, 16, 8, 3, 1e-2
    train, _ = load_splits(cfg)
    return cfg, D.num_batches(len(train), cfg.batch_size) * cfg.epochs


def one_run(base, seed: int, f: float, total: int, reference: dict, tmp: Path) -> dict:
    """Train FlexLoRA with ``t_warmup = round(f·T)``; its row of figures."""
    from entrolora.job import train_run

    tw = int(round(f * total))
    READS.clear()
    cfg = type(base)(**{**asdict(base), "seed": seed, "options": {"t_warmup": tw},
                        "output": f"{tmp}/s{seed}-f{f}"})  # fmt: skip
    res = train_run(cfg)
    moved, changes, undone = rank_changes(res.history or [], base.r)
    final = res.history[-1][1] if res.history else {}
    first = READS[0][1] if READS and READS[0][0] == tw else None
    run = {"seed": seed, "fraction": f, "t_warmup": tw, "total_steps": total,
           "accuracy": res.metrics["accuracy"], "moved": moved, "changes": changes,
           "undone": undone, "off_r0": sum(v != base.r for v in final.values()),
           "agreement": spearman(first, reference) if first else float("nan"),
           "history": res.history}  # fmt: skip
    print(f"seed {seed} t_warmup {tw:>3} ({f:g}·T): accuracy {100 * run['accuracy']:.2f} %, "
          f"agreement {run['agreement']:.2f}, {changes} rank changes, {undone} undone, "
          f"{run['off_r0']} modules ≠ r0", flush=True)  # fmt: skip
    return run


def agreement_table(runs: list[dict], total: int) -> str:
    """ρ(importance at step t, importance at the last step) of the no-move reference runs."""
    steps = sorted({min(total - 1, int(round(p * total))) for p in AGREEMENT_AT})
    refs = [r for r in runs if r["fraction"] is None]
    lines = [
        "| seed | " + " | ".join(f"t = {t}" for t in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for r in refs:
        cells = [r["curve"].get(t) for t in steps]
        lines.append(
            f"| {r['seed']} | "
            + " | ".join("–" if c is None or c != c else f"{c:.2f}" for c in cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def reference_run(base, seed: int, tmp: Path) -> dict:
    """FlexLoRA with ``b0 = 0`` (no move), reading the importance at every step."""
    from entrolora.job import train_run

    READS.clear()
    EVERY_STEP[0] = True
    try:
        cfg = type(base)(**{**asdict(base), "seed": seed, "options": {"b0": 0},
                            "output": f"{tmp}/s{seed}-ref"})  # fmt: skip
        res = train_run(cfg)
    finally:
        EVERY_STEP[0] = False
    reference = READS[-1][1]
    curve = {t: spearman(imp, reference) for t, imp in READS}
    print(f"seed {seed} reference (no moves): accuracy {100 * res.metrics['accuracy']:.2f} %; "
          f"agreement at t = 1, 2, 5: {curve.get(1, 0):.2f} {curve.get(2, 0):.2f} "
          f"{curve.get(5, 0):.2f}", flush=True)  # fmt: skip
    return {"seed": seed, "fraction": None, "accuracy": res.metrics["accuracy"],
            "reference": reference, "curve": curve}  # fmt: skip


def collect(base, total, seeds, fractions, done, path: Path, tmp: Path) -> list[dict]:
    """Every (seed, fraction) run and each seed's reference, reusing those in ``done``; the list
    so far is written to ``path`` after each seed."""
    runs: list[dict] = []
    for seed in seeds:
        mine = [r for r in done if r["seed"] == seed]
        ref = next((r for r in mine if r["fraction"] is None and "curve" in r), None)
        ref = ref or reference_run(base, seed, tmp)
        ref["curve"] = {int(t): v for t, v in ref["curve"].items()}  # JSON keys are strings
        runs.append(ref)
        for f in fractions:
            old = [r for r in mine if r["fraction"] == f]
            runs.append(old[0] if old else one_run(base, seed, f, total, ref["reference"], tmp))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(runs, indent=1) + "\n")
    return runs


def summarise(runs: list[dict], fractions: list[float]) -> str:
    """The markdown table: one row per fraction, means (± std) over seeds."""

    def ms(values: list[float], digits: int) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"

    lines = [
        "| t_warmup | accuracy % | importance agreement ρ | reversal rate | directions moved "
        "| modules ≠ r₀ | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in fractions:
        rows = [r for r in runs if r["fraction"] == f]
        if not rows:
            continue
        rate = [r["undone"] / r["changes"] for r in rows if r["changes"]]
        rho = [r["agreement"] for r in rows if r["agreement"] == r["agreement"]]  # not NaN
        lines.append(
            f"| {f:g}·T = {rows[0]['t_warmup']} | {ms([100 * r['accuracy'] for r in rows], 2)} "
            f"| {ms(rho, 2) if rho else '–'} | {ms(rate, 2) if rate else '–'} "
            f"| {ms([r['moved'] for r in rows], 1)} | {ms([r['off_r0'] for r in rows], 1)} "
            f"| {','.join(str(r['seed']) for r in rows)} |"
        )
    refs = [r for r in runs if r["fraction"] is None]
    if refs:
        lines.append(
            f"| no moves (b₀ = 0, reference) | {ms([100 * r['accuracy'] for r in refs], 2)} "
            f"| 1 | – | 0 | 0 | {','.join(str(r['seed']) for r in refs)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny random model and data (CI)")
    ap.add_argument("--fractions", default="0.1,0.2,0.3,0.4,0.5", help="t_warmup / T values")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--output", default=str(ROOT / "docs" / "flexlora"), help="table folder")
    ap.add_argument("--name", default="warmup", help="file names: <name>.md, <name>.json")
    ap.add_argument(
        "--resume", action="store_true", help="keep the runs <name>.json holds, train the rest"
    )
    args = ap.parse_args(argv)
    import os

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"# load average {os.getloadavg()[0]:.2f}; {torch.get_num_threads()} torch threads")
    record_importance()
    out = Path(args.output)
    name = args.name + ("-smoke" if args.smoke else "")
    done = json.loads((out / f"{name}.json").read_text()) if args.resume else []
    with tempfile.TemporaryDirectory(prefix="flexlora-warmup-") as tmp:
        base, total = settings(args, Path(tmp))
        runs = collect(base, total, seeds, fractions, done, out / f"{name}.json", Path(tmp))
    table = summarise(runs, fractions) if fractions else ""
    agree = agreement_table(runs, total)
    head = (f"*`python bench/flexlora/flexlora_warmup.py --fractions '{args.fractions}' --seeds "
            f"{args.seeds}`{' --smoke' if args.smoke else ''}; T = {total} steps*\n\n")  # fmt: skip
    body = (
        head
        + table
        + (
            "\nImportance read at step t against the last step's, Spearman ρ over modules, in the "
            "runs without moves:\n\n" + agree
        )
    )
    (out / f"{name}.md").write_text(body)
    (out / f"{name}.json").write_text(json.dumps(runs, indent=1) + "\n")
    print(body)
    return runs


if __name__ == "__main__":
    main()

"""``demo_run``: several methods trained on the same data, seed and budget, side by side."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from ..files import atomic_write_text
from ..guards.staging import OutputFolder
from .config import MODEL_PLANNERS, PEFT_METHODS, RunResult, TrainConfig, normalize_method
from .run import train_run

DEMO_METHODS = ("lora", "e2lora", "ralora", "flexlora")
DEMO_MARKER = "demo.json"


def demo_run(
    base: TrainConfig, methods: Sequence[str] = DEMO_METHODS, output: str = "runs/demo"
) -> list[RunResult]:
    """Train each method with ``base``'s data, seed and budget into ``output/<method>``.

    The statistics are probed once (by the first method that needs them) and reused. A previous
    demo in ``output`` (it holds ``demo.json``) is replaced; any other content is refused unless
    ``base.overwrite``. Writes ``output/report.html`` comparing the runs.
    """
    out = Path(output)
    methods = [normalize_method(m) for m in methods]
    results: list[RunResult] = []
    with OutputFolder(out, "demo", overwrite=True) as stage:
        stats_path = base.stats
        for m in methods:
            cfg = replace(base, method=m, options={}, overwrite=False,
                          output=str(stage.path / m), report=True)  # fmt: skip
            if m not in MODEL_PLANNERS and m not in PEFT_METHODS:
                cfg.stats = stats_path
            res = train_run(cfg)
            results.append(res)
            if stats_path is None and (res.output / "stats.safetensors").is_file():
                stats_path = str(res.output / "stats.safetensors")  # probe once, reuse
        from ..report import gather, write_report

        # every run side by side: table, each run's plan titled with it, links to its report
        # (relative links inside the folder, so they survive the rename that publishes it)
        write_report(stage.path, gather([stage.path / m for m in methods]),
                     title="entrolora demo: " + ", ".join(methods))  # fmt: skip
        atomic_write_text(stage.path / DEMO_MARKER, json.dumps(demo_record(base, methods, out)))
        stage.publish()
    return [replace(r, output=out / r.output.name) for r in results]


def demo_record(base: TrainConfig, methods: Sequence[str], output: Path) -> dict:
    """``demo.json``: the methods, each one's run folder (relative to the demo folder) and the
    settings they share (the per-run ones, method, output and options, left out)."""
    shared = {k: v for k, v in asdict(base).items()
              if k not in ("method", "output", "options", "overwrite", "report")}  # fmt: skip
    return {
        "methods": list(methods),
        "runs": {m: m for m in methods},
        "output": str(output),
        "config": json.loads(json.dumps(shared, default=str)),
    }

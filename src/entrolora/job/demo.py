"""``demo_run``: several methods trained on the same data, seed and budget, side by side."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from ..files import atomic_write_text
from .config import MODEL_PLANNERS, PEFT_METHODS, RunResult, TrainConfig, normalize_method
from .run import train_run
from .runfolder import OutputFolder

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
        from ..report import ReportInputs, write_report

        write_report(
            stage.path,
            ReportInputs(  # a one-method demo reports that run's metrics
                runs=[r.metrics for r in results],
                metrics=results[0].metrics if len(results) == 1 else None,
            ),
            title="entrolora demo: " + ", ".join(methods),
        )
        atomic_write_text(
            stage.path / DEMO_MARKER,
            json.dumps({"methods": methods, "config": asdict(base)}, default=str),
        )
        stage.publish()
    return [replace(r, output=out / r.output.name) for r in results]

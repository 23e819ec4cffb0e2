"""bench/planner.py --smoke runs end to end (so the benchmark cannot rot); no timing asserts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "planner.py"


def test_bench_planner_smoke(capsys):
    spec = importlib.util.spec_from_file_location("bench_planner", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules[spec.name]
    results = bench.main(["--smoke"])
    assert [(r.method, r.options) for r in results] == list(bench.CASES)
    assert all(r.modules == 8 and r.median_ms > 0 and r.best_ms > 0 for r in results)
    greedy, dp = results[1], results[2]
    assert 2 <= greedy.intervals <= 8 and dp.intervals == 8  # dp with λ = 0.5: singletons
    out = capsys.readouterr().out
    assert "plan_lora" in out and "greedy E²LoRA" in out

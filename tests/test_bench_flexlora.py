"""bench/flexlora.py --smoke runs end to end (so the benchmark cannot rot); no timing asserts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "flexlora.py"


def test_bench_flexlora_smoke(capsys):
    spec = importlib.util.spec_from_file_location("bench_flexlora", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules[spec.name]
    results = bench.main(["--smoke"])
    assert [r.method for r in results] == list(bench.METHODS)
    assert all(r.median_ms > 0 and r.trainable > 0 for r in results)
    # FlexLoRA allocates all c = 16 slots: P, Q twice LoRA r=8's A, B, plus 16 λ per module
    # (7 projections × 2 layers in the smoke model).
    lora, _, flex = results
    assert flex.trainable == 2 * lora.trainable + 16 * 7 * 2
    out = capsys.readouterr().out
    assert "tiny Llama (smoke)" in out and "FlexLoRA r=8 c=16" in out and "× LoRA" in out

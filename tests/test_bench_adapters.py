"""bench/adapters.py --smoke runs end to end (so the benchmark cannot rot); no timing asserts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "adapters.py"


def test_bench_adapters_smoke(tmp_path):
    pytest.importorskip("peft")
    spec = importlib.util.spec_from_file_location("bench_adapters", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(bench)
    rows = bench.main(["--smoke", "--json", str(tmp_path / "rows.json")])
    names = [r.name for r in rows]
    assert names[:2] == ["peft-lora-r8", "peft-dora-r8"]
    assert {"lora-r8", "e2lora-intervals", "e2sharelora", "blockdiag-n8", "dora-r8"} <= set(names)
    by = {r.name: r for r in rows}
    # same parameter count as peft LoRA of the same rank; sharing and blocks as planned
    assert by["lora-r8"].trainable == by["peft-lora-r8"].trainable
    assert by["blockdiag-n4"].trainable == by["lora-r8"].trainable
    assert by["e2lora-intervals"].trainable == by["lora-r8"].trainable // 4  # 4-layer intervals
    assert by["dora-r8"].trainable == by["peft-dora-r8"].trainable
    assert all(r.time_ratio > 0 for r in rows[2:])
    assert len(json.loads((tmp_path / "rows.json").read_text())) == len(rows)

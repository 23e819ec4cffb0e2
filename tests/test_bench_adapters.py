"""bench/adapters.py --smoke runs end to end (so the benchmark cannot rot); no timing asserts."""

from __future__ import annotations

import json

import pytest

from scripts import load_script


def test_bench_adapters_smoke(tmp_path):
    pytest.importorskip("peft")
    bench = load_script("bench/adapters.py")
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

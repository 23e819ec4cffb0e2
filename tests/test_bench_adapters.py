"""bench/speed/adapters.py --smoke runs end to end (so it cannot rot); no timing asserts."""

from __future__ import annotations

import json

import pytest

from scripts import load_script


def test_bench_adapters_smoke(tmp_path):
    pytest.importorskip("peft")
    bench = load_script("bench/speed/adapters.py")
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
    assert all(r.time_ratio > 0 and len(r.round_ratios) == 2 for r in rows[2:])  # 2 rounds
    assert len(json.loads((tmp_path / "rows.json").read_text())) == len(rows)


def test_bench_adapters_blocks_from_a_planner_plan(tmp_path):
    pytest.importorskip("peft")
    bench = load_script("bench/speed/adapters.py")
    from transformers import LlamaForCausalLM

    import entrolora as el

    model = LlamaForCausalLM(bench.llama_config("toy"))
    targets = el.find_targets(model, bench.TARGETS)
    counts = {n: (4 if t.module_type.endswith("q_proj") else 2) for n, t in targets.items()}
    path = tmp_path / "plan.json"
    bench._plan(targets, blocks=counts).save(path)
    assert bench.planner_blocks(path, targets) == counts
    rows = bench.main(["--smoke", "--rounds", "1", "--steps", "1", "--blocks-from", str(path)])
    by = {r.name: r for r in rows}
    assert by["ralora-plan"].trainable == by["lora-r8"].trainable  # r·(d_in + d_out) any n
    other = tmp_path / "other.json"
    bench._plan(dict(list(targets.items())[:2])).save(other)
    with pytest.raises(ValueError, match=r"--blocks-from plan has no module .*q, k, v, o"):
        bench.planner_blocks(other, targets)

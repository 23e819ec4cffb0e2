"""bench/flexlora.py --smoke runs end to end (so the benchmark cannot rot); no timing asserts."""

from __future__ import annotations

from scripts import load_script


def test_bench_flexlora_smoke(capsys):
    bench = load_script("bench/flexlora.py")
    results = bench.main(["--smoke"])
    assert [r.method for r in results] == list(bench.METHODS)
    assert all(r.median_ms > 0 and r.trainable > 0 for r in results)
    # FlexLoRA allocates all c = 16 slots: P, Q twice LoRA r=8's A, B, plus 16 λ per module
    # (7 projections × 2 layers in the smoke model).
    lora, _, flex = results
    assert flex.trainable == 2 * lora.trainable + 16 * 7 * 2
    out = capsys.readouterr().out
    assert "toy Llama shape (smoke)" in out and "FlexLoRA r=8 c=16" in out and "× LoRA" in out

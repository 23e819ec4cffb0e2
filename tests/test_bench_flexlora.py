"""bench/flexlora/flexlora.py --smoke runs end to end (so it cannot rot); no timing asserts."""

from __future__ import annotations

from scripts import load_script


def test_bench_flexlora_smoke(capsys):
    bench = load_script("bench/flexlora/flexlora.py")
    results = bench.main(["--smoke"])
    assert [r.method for r in results] == list(bench.METHODS)
    assert all(r.median_ms > 0 and r.trainable > 0 for r in results)
    # FlexLoRA allocates all c = 16 slots: P, Q twice LoRA r=8's A, B, plus 16 λ per module
    # (7 projections × 2 layers in the smoke model).
    lora, _, flex = results
    assert flex.trainable == 2 * lora.trainable + 16 * 7 * 2
    out = capsys.readouterr().out
    assert "toy Llama shape (smoke)" in out and "FlexLoRA r=8 c=16" in out and "× LoRA" in out


def test_bench_flexlora_shapes_parse():
    bench = load_script("bench/flexlora/flexlora.py")
    args = bench.parse(["--shape", "smollm2"])
    assert (args.shape, args.device.type, args.batch, args.seq) == ("smollm2", "cpu", 2, 64)
    cfg = bench.llama_config("smollm2")  # SmolLM2-135M's shape
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert bench.parse(["--smoke"]).shape == "toy"


def test_warmup_rank_changes_and_spearman():
    bench = load_script("bench/flexlora/flexlora_warmup.py")
    history = [(5, {"a": 3, "b": 1}), (7, {"a": 2, "b": 2}), (9, {"a": 2, "b": 2})]
    # a: 2 → 3 → 2 (the second change undoes the first); b: 2 → 1 → 2 (likewise)
    assert bench.rank_changes(history, 2) == (2, 4, 2)
    assert bench.rank_changes([], 2) == (0, 0, 0)
    assert bench.spearman({"a": 1, "b": 2, "c": 3}, {"a": 10, "b": 20, "c": 30}) == 1.0
    assert bench.spearman({"a": 1, "b": 2, "c": 3}, {"a": 3, "b": 2, "c": 1}) == -1.0


def test_bench_flexlora_warmup_and_curves_smoke(tmp_path):
    warmup = load_script("bench/flexlora/flexlora_warmup.py")
    runs = warmup.main(["--smoke", "--fractions", "0.5", "--seeds", "0", "--output", str(tmp_path)])
    assert [r["fraction"] for r in runs] == [None, 0.5]
    assert runs[1]["t_warmup"] > 0 and -1 <= runs[1]["agreement"] <= 1
    assert "| 0.5·T = " in (tmp_path / "warmup-smoke.md").read_text()
    curves = load_script("bench/flexlora/flexlora_curves.py")
    out = curves.main(["--smoke", "--output", str(tmp_path)])
    assert list(out["runs"]) == list(curves.METHODS)
    assert all(len(r["losses"]) > 0 for r in out["runs"].values())
    assert (tmp_path / "flexlora_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

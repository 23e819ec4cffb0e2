"""bench/speed/planner.py --smoke runs end to end (so it cannot rot); no timing asserts."""

from __future__ import annotations

from scripts import load_script


def test_bench_planner_smoke(capsys):
    bench = load_script("bench/speed/planner.py")
    results = bench.main(["--smoke"])
    assert [(r.method, r.options) for r in results] == [*bench.CASES, ("auto", {})]
    assert all(r.modules == 8 and r.median_ms > 0 and r.best_ms > 0 for r in results[:-1])
    assert 0 < results[-1].modules <= 28 and results[-1].median_ms > 0
    greedy, dp = results[1], results[2]
    assert 2 <= greedy.intervals <= 8 and dp.intervals == 8  # dp with λ = 0.5: singletons
    out = capsys.readouterr().out
    assert "plan_lora" in out and "greedy E²LoRA" in out and "Llama-3-8B shapes" in out

"""bench/erank.py --smoke runs end to end and reports what it measured; no timing asserts."""

from __future__ import annotations

from scripts import load_script


def test_bench_erank_smoke(capsys):
    bench = load_script("bench/erank.py")
    rows = bench.main(["--smoke", "--seeds", "1"])
    assert [(r["shape"], r["statistic"]) for r in rows] == [
        ("1600x1300", "raw"),
        ("1600x1300", "signal"),
    ]
    raw, signal = rows
    assert abs(raw["max_err"]) < 0.01  # the raw estimate is within 1 % of exact
    assert abs(signal["max_err"]) < 0.05
    for r in rows:
        assert 1 <= r["exact"] <= 1300 and r["exact_cpu"] > 0 and r["fast_cpu"] > 0
    out = capsys.readouterr().out
    assert "load average" in out and "1600x1300" in out and "signal" in out


def test_gradient_pair_has_the_documented_noise_floor():
    bench = load_script("bench/erank.py")
    g, d = bench.gradient_pair(300, 200, alpha=1.0)
    # G = μ + (e₁+e₂)/2 with ‖(e₁+e₂)/2‖ ≈ ν/√64·‖μ‖ = 0.5‖μ‖, and D has the same size
    # ‖D‖ = 0.5‖μ‖ and ‖G‖² ≈ 1.25‖μ‖², so ‖D‖/‖G‖ ≈ 0.5/√1.25 ≈ 0.45
    assert 0.40 < float(d.norm() / g.norm()) < 0.50
    assert g.dtype == d.dtype == bench.torch.float32


def test_whole_model_counts_each_shape_and_keeps_small_ones_exact():
    bench = load_script("bench/erank.py")
    rows = [
        dict(shape=s, alpha=1.0, statistic="raw", exact_cpu=e, fast_cpu=f)
        for s, e, f in (("4096x4096", 8.0, 1.0), ("1024x4096", 0.4, 0.3), ("14336x4096", 14.0, 2.5))
    ]
    (line,) = bench.whole_model(rows)
    exact = 32 * (2 * 8.0 + 2 * 0.4 + 3 * 14.0)  # 1881.6
    auto = 32 * (2 * 1.0 + 2 * 0.4 + 3 * 2.5)  # 329.6: 1024 is below FAST_MIN_SIDE, exact
    assert f"exact {exact:.0f} CPU s, auto {auto:.0f} CPU s, {exact / auto:.1f}×" in line
    assert "all 224 targets" in line
    assert bench.whole_model(rows[:2]) == []  # a shape missing: no total

"""bench/speed/probe_all_linear.py --smoke runs end to end on the embedded MiniLM (slow: two fresh
processes load the model); no timing asserts."""

from __future__ import annotations

import pytest

from scripts import load_script


@pytest.mark.slow
def test_bench_probe_all_linear_smoke(capsys):
    rows = load_script("bench/speed/probe_all_linear.py").main(["--smoke"])
    assert [r["targets"] for r in rows] == ["default", "all-linear"]
    assert [r["modules"] for r in rows] == [24, 36]  # MiniLM: 6 layers × 4, × 6
    assert all(r["steps"] == 2 and r["peak_rss_mib"] > r["rss_before_mib"] > 0 for r in rows)
    assert rows[1]["kept_mib"] == 3 * rows[0]["kept_mib"]
    assert "fresh process" in capsys.readouterr().out

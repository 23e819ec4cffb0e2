"""bench/stability.py --smoke runs end to end and resumes from its JSONL (issue 14)."""

from __future__ import annotations

import json

from scripts import load_script


def test_bench_stability_smoke(tmp_path, capsys):
    bench = load_script("bench/stability.py")
    stem = tmp_path / "smoke"
    out = bench.main(["--smoke", "--out", str(stem)])
    lines = stem.with_suffix(".jsonl").read_text().splitlines()
    assert len(lines) == 4  # 2 subsets × head-fit 0 and 4
    rec = json.loads(lines[0])
    assert set(rec) >= {"probe", "size", "snr", "raw", "signal"} and rec["size"] == 4
    assert rec["signal"]["used"] == "signal" and rec["raw"]["used"] == "raw"
    assert set(rec["raw"]["blocks"]) == set(rec["snr"])  # every probed module has a block count
    table = stem.with_suffix(".txt").read_text()
    assert table == out["text"] + "\n"
    assert "E²LoRA intervals" in table and "RaLoRA blocks" in table
    assert sum(line.startswith("smoke") for line in table.splitlines()) == 4
    # a rerun reuses every probe: nothing is probed again
    capsys.readouterr()
    bench.main(["--smoke", "--out", str(stem)])
    assert "probed" not in capsys.readouterr().out
    assert len(stem.with_suffix(".jsonl").read_text().splitlines()) == 4


def test_identical_share_counts_items_equal_in_every_probe():
    bench = load_script("bench/stability.py")
    recs = [{"raw": {"blocks": {"a": 1, "b": 2}}}, {"raw": {"blocks": {"a": 1, "b": 4}}}]
    assert bench.identical_share(recs, "raw", "blocks") == (1, 2)

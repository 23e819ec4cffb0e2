"""bench/speed/sft_step.py --smoke runs end to end (so it cannot rot); no timing asserts."""

from __future__ import annotations

import pytest

from scripts import load_script


def test_bench_sft_step_smoke(capsys):
    pytest.importorskip("peft")
    out = load_script("bench/speed/sft_step.py").main(["--smoke"])
    assert out["ratio"] > 0 and all(len(t) == 4 for t in out["times"].values())  # 2 rounds × 2
    text = capsys.readouterr().out
    assert "entrolora-lora-r8" in text and "peft-lora-r8" in text and "length-grouped" in text

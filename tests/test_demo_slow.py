"""Integration on the real embedded default (MiniLM + Rotten Tomatoes): opt in with ``-m slow``."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from entrolora.cli import app
from entrolora.data import datasets as D

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def need_assets():
    try:
        D.minilm_path()
        D.default_data_path()
    except D.AssetMissing as e:
        pytest.skip(str(e))


def test_train_real_default_few_steps(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["train", "--method", "e2lora", "--limit", "400", "--max-steps", "4", "--probe-steps",
         "4", "--batch-size", "16", "--quiet", "--output", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 4 and m["model_family"] == "bert"
    assert m["train_examples"] + m["test_examples"] == 400
    assert 0.0 <= m["accuracy"] <= 1.0
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["modules"]) == 6 * 4  # 6 layers × q, k, v, attention output
    for name in ("stats.safetensors", "report.html", "similarity_entropy.png", "erank.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "peft" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("task", ["classify", "causal-lm"])
def test_train_smollm2_few_steps(tmp_path, task):
    """The GGUF-loaded SmolLM2 trains and exports for both tasks (it once failed at .float())."""
    try:
        D.smollm2_gguf()
    except D.AssetMissing as e:
        pytest.skip(str(e))
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["train", "--model", "smollm2", "--task", task, "--method", "e2lora", "--limit", "200",
         "--max-steps", "2", "--probe-steps", "2", "--batch-size", "8", "--quiet", "--output",
         str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 2 and m["model_family"] == "llama"
    assert len(json.loads((out / "plan.json").read_text())["modules"]) == 30 * 4
    assert (out / "peft" / "adapter_model.safetensors").stat().st_size > 0

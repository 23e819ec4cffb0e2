"""``entrolora export`` end to end on tiny saved models: layouts, --merged, --hf-base, the card,
and AutoPeftModelFor… / AutoModelFor… loading each folder alone (METHODS.md §6)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import entrolora as el
from entrolora.cli import app
from test_data import save_tiny_model, write_csv

peft = pytest.importorskip("peft")
runner = CliRunner()
FAST = ["--epochs", "1", "--batch-size", "8", "--quiet", "--probe-steps", "2", "--lr", "5e-2"]
IDS = torch.randint(5, 60, (2, 7), generator=torch.Generator().manual_seed(0))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A causal-LM RaLoRA run (heterogeneous ranks) and an E²LoRA classifier run."""
    root = tmp_path_factory.mktemp("export-cli")
    out = {"llama": save_tiny_model(root, "llama"), "bert": save_tiny_model(root, "bert")}
    csv = write_csv(root / "d.csv", n=48)
    for name, task, method in (("llama", "causal-lm", "ralora"), ("bert", "classify", "e2lora")):
        r = invoke("train", "--model", out[name], "--data", csv, "--task", task, "--method",
                   method, "--r", "4", "--output", root / f"run-{name}", *FAST)  # fmt: skip
        assert r.exit_code == 0, r.output
        out[f"run-{name}"] = root / f"run-{name}"
    return out


def trained(runs, name: str):
    """The run's model rebuilt from its own files (base + head + el.load)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    run = runs[f"run-{name}"]
    auto = AutoModelForCausalLM if name == "llama" else AutoModelForSequenceClassification
    model = auto.from_pretrained(runs[name])
    if (run / "adapter" / "head.safetensors").is_file():
        model.load_state_dict(load_file(run / "adapter" / "head.safetensors"), strict=False)
    return el.load(model, run / "adapter").eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_default_export_loads_alone_and_says_what_it_serves(runs, name, tmp_path):
    r = invoke("export", runs[f"run-{name}"], "--output", tmp_path / "p")
    assert r.exit_code == 0, r.output
    assert "uniform layout" in r.stdout
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(runs[name].resolve())
    assert cfg["r"] == cfg["lora_alpha"] and cfg["rank_pattern"] == {}
    want = logits(trained(runs, name))
    if name == "llama":
        assert cfg["task_type"] == "CAUSAL_LM" and "llama.cpp" in r.stdout
        got = logits(peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "p"))
    else:
        assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
        got = logits(peft.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "p"))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    card = (tmp_path / "p" / "README.md").read_text()
    assert "library_name: peft" in card
    assert ("| accuracy |" in card) == (name == "bert")  # the run's scores reach the card


def test_run_folder_export_has_card_and_vllm_rank(runs):
    metrics = json.loads((runs["run-llama"] / "metrics.json").read_text())
    assert metrics["max_lora_rank"] in (1, 8, 16, 32, 64, 128, 256, 320, 512)
    card = (runs["run-llama"] / "peft" / "README.md").read_text()
    assert "ralora" in card and f"max_lora_rank={metrics['max_lora_rank']}" in card


def test_compact_export_warns_about_llama_cpp(runs, tmp_path):
    r = invoke("export", runs["run-llama"], "--output", tmp_path / "c", "--layout", "compact")
    assert r.exit_code == 0, r.output
    assert "compact layout" in r.stdout and "WRONG outputs in llama.cpp" in r.stdout
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] and cfg["rank_pattern"]


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_merged_export_loads_with_plain_transformers(runs, name, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    r = invoke("export", runs[f"run-{name}"], "--output", tmp_path / "m", "--merged")
    assert r.exit_code == 0, r.output
    assert "merged model" in r.stdout
    auto = AutoModelForCausalLM if name == "llama" else AutoModelForSequenceClassification
    want = logits(trained(runs, name))
    got = logits(auto.from_pretrained(tmp_path / "m").eval())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert (
        tok("good film")["input_ids"]
        == AutoTokenizer.from_pretrained(runs[name])("good film")["input_ids"]
    )


def test_hf_base_export_is_the_base_model(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    r = invoke("export", runs["run-llama"], "--output", tmp_path / "b", "--hf-base")
    assert r.exit_code == 0, r.output
    want = logits(AutoModelForCausalLM.from_pretrained(runs["llama"]))
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "b")), want)


@pytest.mark.parametrize(
    "args,match",
    [
        (["--layout", "wide"], "unknown export layout 'wide'"),
        (["--merged", "--hf-base"], "--merged and --hf-base write different folders"),
        (["--merged", "--layout", "compact"], "--layout applies to the peft export only"),
    ],
)
def test_contradictory_export_options_are_refused(runs, args, match, tmp_path):
    r = invoke("export", runs["run-llama"], "--output", tmp_path / "x", *args)
    assert r.exit_code == 1, r.output
    assert r.stderr.strip().startswith("error: ") and match in r.stderr
    assert not (tmp_path / "x").exists()

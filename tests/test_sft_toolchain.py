"""``--task sft`` through the rest of the toolchain: every method, ``generate`` from a run and
from its peft export, ``export --merged``, ``report`` and the HF Trainer callback."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from entrolora.cli import app
from entrolora.data import sft as S
from entrolora.job import ENTROLORA_METHODS, PEFT_METHODS, export_run, train_run
from entrolora.job import sft as J
from entrolora.job.generate import generate, load_answerer
from sft_tiny import save_tiny_sft_model, sft_rows, write_jsonl

runner = CliRunner()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-tools")
    return {
        "root": root,
        "model": str(save_tiny_sft_model(root)),
        "data": str(write_jsonl(root / "d.jsonl", sft_rows(80))),
    }


def cfg(assets, out, **kw):
    base = dict(model=assets["model"], data=assets["data"], method="lora", r=2, max_steps=3,
                batch_size=8, max_length=24, probe_steps=2, output=str(out), progress=False,
                report=False)  # fmt: skip
    return J.sft_config(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(assets):
    """A LoRA run trained long enough to answer some rows right: on every linear layer (LoRA on
    the attention alone of this random tiny model barely moves the loss, and whether a row comes
    out right then depends on the thread count's rounding)."""
    return train_run(cfg(assets, assets["root"] / "run", r=8, max_steps=None, epochs=30, lr=1e-2,
                         target_modules=["all-linear"], report=True)).output  # fmt: skip


@pytest.mark.parametrize("method", ENTROLORA_METHODS + PEFT_METHODS)
def test_every_method_trains_under_sft(assets, tmp_path, method):
    res = train_run(cfg(assets, tmp_path / method, method=method))
    m = res.metrics
    assert m["steps"] == 3 and 0 <= m["exact_match"] <= 1 and m["eval_loss"] > 0
    peft_cfg = json.loads((res.output / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["task_type"] == "CAUSAL_LM"
    if method == "flexlora":
        assert (res.output / "flex_history.json").is_file()


def test_generate_from_run_and_from_its_peft_export_agree(assets, trained, tmp_path):
    rows = sft_rows(30, seed=5)
    prompts = [r["prompt"] for r in rows]
    from_run = load_answerer(trained)
    answers = generate(from_run, prompts, max_new_tokens=4, batch_size=7)
    export_run(trained, tmp_path / "exp")
    for folder in (tmp_path / "exp", trained / "peft"):
        assert generate(load_answerer(folder), prompts, max_new_tokens=4) == answers
    # a teacher-forced exact match is the answer that generate gives
    toks = S.tokenize(from_run.tokenizer, S.SFTDataset(prompts, [r["completion"] for r in rows]),
                      24, "auto")  # fmt: skip
    ok, _, _ = J.teacher_forced(from_run.model, toks, 8, torch.device("cpu"), 0)
    assert [a == r["completion"] for a, r in zip(answers, rows)] == ok
    assert any(ok), "the run should answer some rows right"


def test_cli_generate_prompt_and_data(assets, trained, tmp_path):
    r = runner.invoke(app, ["generate", str(trained), "--prompt", "w3 good w4", "--prompt", "w5"])
    assert r.exit_code == 0, r.output
    assert r.output.count("\n") == 2  # one line per answer (an answer may be empty)
    out = tmp_path / "answers.jsonl"
    r = runner.invoke(app, ["generate", str(trained / "peft"), "--data", assets["data"],
                            "--output", str(out), "--max-new-tokens", "3"])  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 80 and set(lines[0]) == {"prompt", "answer"}
    bad = runner.invoke(app, ["generate", str(trained)])
    assert bad.exit_code == 1 and "pass --prompt TEXT (repeatable) or --data FILE" in bad.stderr


def test_generate_refuses_a_classifier_export(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS"}))
    with pytest.raises(ValueError, match="task_type SEQ_CLS; generate needs a CAUSAL_LM adapter"):
        load_answerer(tmp_path)


def test_merged_export_scores_as_the_run(assets, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    export_run(trained, tmp_path / "merged", merged=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    a = load_answerer(trained)
    train_rows, test_rows = J.load_sft_splits(cfg(assets, tmp_path / "x"))
    toks = S.tokenize(a.tokenizer, test_rows, 24, "auto")
    dev = torch.device("cpu")
    want = J.evaluate_sft(a.model, toks, 8, dev, 0)
    got = J.evaluate_sft(merged, toks, 8, dev, 0)
    assert got["exact_match"] == want["exact_match"]
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-4)


def test_report_of_an_sft_run(trained, tmp_path):
    r = runner.invoke(app, ["report", str(trained), "--output", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "Exact match by category" in html and "exact_match" in html


def test_trainer_callback_trains_sft_rows(assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    import entrolora as el
    from entrolora.integrations.transformers import EntroloraCallback

    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    tok = AutoTokenizer.from_pretrained(assets["model"])
    el.apply(model, el.plan_lora(model, r=4, target_modules=["q_proj", "v_proj"]))
    toks = S.tokenize(tok, S.load_sft(assets["data"]), 24, "auto")
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, save_steps=2, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to=[], use_cpu=True, remove_unused_columns=False,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=S.tokens_as_rows(toks),
            data_collator=S.trainer_collator(tok.pad_token_id),
            callbacks=[EntroloraCallback()]).train()  # fmt: skip
    loaded = el.load(AutoModelForCausalLM.from_pretrained(assets["model"]),
                     tmp_path / "checkpoint-2" / "adapter")  # fmt: skip
    dev = torch.device("cpu")
    assert J.evaluate_sft(loaded, toks, 8, dev, 0) == J.evaluate_sft(model, toks, 8, dev, 0)


@pytest.mark.slow
def test_sft_under_torchrun_writes_once(assets, tmp_path):
    """``torchrun --nproc_per_node 2 -m entrolora.cli train --task sft`` on the CPU (gloo)."""
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "-m", "entrolora.cli", "train", "--task", "sft", "--model", assets["model"], "--data",
        assets["data"], "--method", "e2lora", "--max-steps", "3", "--probe-steps", "2",
        "--batch-size", "8", "--max-length", "24", "--output", str(out), "-q",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("exact match") == 1
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "sft" and m["steps"] == 3 and "by_category" in m
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

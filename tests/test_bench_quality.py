"""bench/quality/quality.py and bench/common.py: the smoke grid runs end to end and resumes; the
summary matches a numpy computation on runs.csv; bad input is refused. No timing asserts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scripts import load_script

quality = load_script("bench/quality/quality.py")
common = load_script("bench/common.py")
qs = load_script("bench/quality/quality_summary.py")
quality_grid = load_script("bench/quality/quality_grid.py")
ql = load_script("bench/quality/quality_lr.py")
qr = load_script("bench/quality/quality_run.py")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    results = tmp_path_factory.mktemp("quality-results")
    folder = quality.main(["--smoke", "--results", str(results), "--quiet"])
    return folder


def test_smoke_grid_rows_and_tables(smoke):
    rows = [r for r in common.read_rows(smoke / "runs.csv") if r["phase"] != "sweep"]
    select = [r for r in rows if r["phase"] == "select"]
    test = [r for r in rows if r["phase"] == "test"]
    # Cell by cell: its learning-rate selection (every lr of the grid), then its test run.
    assert [(r["cell"], r["phase"], r["lr"] if r["phase"] == "select" else "") for r in rows] == [
        (c, phase, lr)
        for c in quality.SMOKE_CELLS
        for phase, lr in (("select", "0.002"), ("select", "0.005"), ("test", ""))
    ]
    assert {r["seed"] for r in rows} == {"0"}
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0
        assert int(r["steps"]) == 2
    # 64 rows: 13 test, and 15 % of the 51 training rows (8) validate the selection runs.
    for r in select:
        assert (r["val_examples"], r["test_examples"], r["train_examples"]) == ("8", "", "43")
    for r in test:
        assert (r["val_examples"], r["test_examples"], r["train_examples"]) == ("", "13", "51")
    for r in test:  # each test run at the lr its cell's validation runs chose
        runs = [x for x in select if x["cell"] == r["cell"]]
        best = max(runs, key=lambda x: (float(x["accuracy"]), -float(x["eval_loss"])))
        assert float(r["lr"]) == float(best["lr"])
    by_cell = {r["cell"]: r for r in test}
    # Tiny BERT: 3 layers × 4 attention targets (32×32), LoRA r=8 has A (8×32) and B (32×8).
    assert int(by_cell["lora-r8"]["trainable_params"]) == 3 * 4 * (8 * 32 + 32 * 8)
    assert by_cell["peft-lora-r8"]["trainable_params"] == by_cell["lora-r8"]["trainable_params"]
    # The selection runs train on other rows than the test runs: their statistics are their own.
    e2 = [r for r in rows if r["cell"] == "e2lora-r8"]
    assert [r["stats_reused"] for r in e2] == ["False", "True", "False"]
    table = (smoke / "table.md").read_text(encoding="utf-8")
    for label in ("LoRA r=8", "E²LoRA r=8", "peft LoRA r=8"):
        assert f"| {label} | " in table
    assert f"| LoRA r=8 | methods | {by_cell['lora-r8']['lr']} |" in table
    assert (
        "Finished test runs: 3 of 3 (cells × seeds); learning-rate selection runs: 6 of 6" in table
    )
    assert "(one seed)" in table  # no ± 0.00 pretending to be an error bar
    claims = (smoke / "claims.md").read_text(encoding="utf-8")
    assert "entrolora LoRA matches peft LoRA (sanity)" in claims
    assert "RaLoRA" not in claims  # claims about cells outside the grid are left out
    selection = (smoke / "lr_selection.md").read_text(encoding="utf-8")
    assert "| LoRA r=8 | " in selection and "| chosen lr |" in selection
    assert (smoke / "table.csv").is_file()
    pytest.importorskip("matplotlib")
    assert (smoke / "accuracy_vs_params.png").stat().st_size > 0


def test_lr_sweep_runs_its_own_steps_beside_the_selection_runs(smoke):
    before = common.read_rows(smoke / "runs.csv")
    quality.main(["--smoke", "--lr-sweep", "--results", str(smoke.parent), "--quiet"])
    rows = common.read_rows(smoke / "runs.csv")
    new = rows[len(before) :]
    assert [(r["cell"], r["phase"], r["lr"], r["steps"]) for r in new] == [
        ("lora-r8", "sweep", lr, "3") for lr in ("0.001", "0.002", "0.005")
    ]
    assert {r["val_examples"] for r in new} == {"8"}  # validation, like the selection runs
    sweep = (smoke / "lr_sweep.md").read_text(encoding="utf-8")
    own = {r["lr"]: r for r in new}
    short = {r["lr"]: r for r in before if r["cell"] == "lora-r8" and r["phase"] == "select"}
    for lr in ("0.001", "0.002", "0.005"):
        acc = f"{100 * float(own[lr]['accuracy']):.2f}"
        loss = f"{float(own[lr]['train_loss']):.3f}"
        grid = f"{100 * float(short[lr]['accuracy']):.2f}" if lr in short else ""
        assert f"| {lr} | {acc} | {loss} | {grid} |" in sweep
    assert "0.002" in short and "0.001" not in short
    pytest.importorskip("matplotlib")
    assert (smoke / "lr_sweep.png").stat().st_size > 0


def test_smoke_grid_resumes_without_rerunning(smoke, capsys):
    before = (smoke / "runs.csv").read_text(encoding="utf-8")
    quality.main(["--smoke", "--results", str(smoke.parent), "--quiet"])
    assert (smoke / "runs.csv").read_text(encoding="utf-8") == before
    assert "seed 0: accuracy" not in capsys.readouterr().out  # no run reported as trained


def _rows(accs: dict[str, list[float]], params: dict[str, int]) -> list[dict[str, str]]:
    return [
        {"cell": k, "seed": str(s), "accuracy": str(a), "trainable_params": str(params[k]),
         "head_params": "10", "train_s": str(1.0 + s), "probe_s": "", "peak_memory_mib": "5"}
        for k, vals in accs.items() for s, a in enumerate(vals)
    ]  # fmt: skip


def test_summary_matches_numpy():
    accs = {"lora-r8": [0.80, 0.82, 0.77], "e2lora-r8": [0.81, 0.79, 0.80]}
    params = {"lora-r8": 1000, "e2lora-r8": 520}
    cells = [c for c in quality.CELLS if c.key in accs]
    summary = {s["cell"].key: s for s in qs.summarize(_rows(accs, params), cells)}
    for key, vals in accs.items():
        v = 100 * np.array(vals, dtype=np.float64)
        assert summary[key]["acc_mean"] == pytest.approx(v.mean(), abs=1e-12)
        assert summary[key]["acc_std"] == pytest.approx(v.std(ddof=1), abs=1e-12)
        assert summary[key]["train_s"] == pytest.approx(2.0)
        assert summary[key]["params"] == [params[key]] * 3
    rows = _rows(accs, params)
    claims = qs.claims_rows(rows, quality.CELLS)
    claim = next(r for r in claims if r["claim"].startswith("E²LoRA matches"))
    d = 100 * (np.array(accs["e2lora-r8"]) - np.array(accs["lora-r8"]))  # paired by seed
    delta, se = d.mean(), d.std(ddof=1) / np.sqrt(3)
    assert claim["Δ acc (pp)"] == f"{delta:+.2f} ± {se:.2f}"
    assert claim["seeds"] == "0,1,2"
    assert claim["params ratio"] == "0.52"
    assert claim["verdict"] == "held"
    assert se > 1 and claim["SE < 1 pp"] == f"≈ {int(np.floor(d.var(ddof=1))) + 1} seeds"
    # The same accuracies with E²LoRA at 0.8× LoRA's parameters: not "about half".
    params["e2lora-r8"] = 800
    claim = qs.claims_rows(_rows(accs, params), quality.CELLS)[0]
    assert claim["verdict"] == "not held (parameter ratio 0.80 > 0.75; accuracy: held)"


def test_select_rows_stay_out_of_the_table_and_claims():
    rows = _rows(
        {"lora-r8": [0.80, 0.82], "e2lora-r8": [0.81, 0.79]}, {"lora-r8": 2, "e2lora-r8": 1}
    )
    noise = {**rows[0], "phase": "select", "lr": "0.005", "accuracy": "0.1"}
    cells = [c for c in quality.CELLS if c.key in ("lora-r8", "e2lora-r8")]
    assert qs.summarize([*rows, noise], cells) == qs.summarize(rows, cells)
    assert qs.claims_rows([*rows, noise], cells) == qs.claims_rows(rows, cells)


def test_seeds_for_se_against_numpy():
    d = np.array([2.5, -1.0, 0.4])  # per-seed differences, pp
    sd = d.std(ddof=1)
    assert sd / np.sqrt(3) > 1.0
    want = int(np.floor(sd**2)) + 1  # the least m with sd / sqrt(m) < 1
    assert sd / np.sqrt(want) < 1.0 <= sd / np.sqrt(want - 1)
    assert qs.seeds_for_se(sd, 3) == f"≈ {want} seeds"
    assert qs.seeds_for_se(0.5, 3) == "met (3 seeds)"
    assert qs.seeds_for_se(0.0, 1) == "needs ≥ 2 seeds"


def test_chosen_lr_best_validation_then_loss_then_smaller():
    def sel(lr, acc, loss, cell="lora-r8", seed=0):
        return {"cell": cell, "seed": str(seed), "phase": "select", "lr": str(lr),
                "accuracy": str(acc), "eval_loss": str(loss)}  # fmt: skip

    lrs = (5e-4, 1e-3, 2e-3)
    rows = [sel(5e-4, 0.70, 0.6), sel(1e-3, 0.75, 0.5), sel(2e-3, 0.75, 0.4)]
    assert ql.chosen_lr(rows, "lora-r8", lrs, 0, edge=0) == 2e-3  # tie on accuracy: lower loss
    rows[2] = sel(2e-3, 0.75, 0.5)
    assert ql.chosen_lr(rows, "lora-r8", lrs, 0, edge=0) == 1e-3  # full tie: the smaller lr
    assert ql.chosen_lr(rows[:2], "lora-r8", lrs, 0) is None  # 2e-3 not run yet
    assert ql.chosen_lr(rows, "lora-r8", lrs, 1) is None  # another seed chooses nothing
    other = [*rows, sel(5e-4, 0.99, 0.1, cell="lora-r4"), sel(5e-4, 0.99, 0.1, seed=1)]
    assert ql.chosen_lr(other, "lora-r8", lrs, 0, edge=0) == 1e-3


def test_a_best_learning_rate_at_the_grid_edge_is_followed_beyond_it():
    def sel(lr, acc):
        return {"cell": "adalora", "seed": "0", "phase": "select", "lr": ql.lr_text(lr),
                "accuracy": str(acc), "eval_loss": "0.5"}  # fmt: skip

    lrs = (5e-4, 1e-3, 2e-3, 5e-3)
    rows = [sel(5e-4, 0.56), sel(1e-3, 0.56), sel(2e-3, 0.70), sel(5e-3, 0.78)]
    assert ql.needed_lrs(rows[:2], "adalora", lrs, 0) == [2e-3, 5e-3]  # the grid first
    assert ql.needed_lrs(rows, "adalora", lrs, 0) == [1e-2]  # best at the top: one step up
    assert ql.chosen_lr(rows, "adalora", lrs, 0) is None  # waits for it
    rows.append(sel(1e-2, 0.80))
    assert ql.needed_lrs(rows, "adalora", lrs, 0) == [2e-2]  # still rising: the last step
    rows.append(sel(2e-2, 0.79))
    assert ql.needed_lrs(rows, "adalora", lrs, 0) == []
    assert ql.chosen_lr(rows, "adalora", lrs, 0) == 1e-2
    rows[-1] = sel(2e-2, 0.90)  # rising to the end: never more than EDGE_STEPS beyond the grid
    assert ql.needed_lrs(rows, "adalora", lrs, 0) == []
    assert ql.chosen_lr(rows, "adalora", lrs, 0) == 2e-2
    low = [sel(5e-4, 0.80), sel(1e-3, 0.70), sel(2e-3, 0.60), sel(5e-3, 0.50)]
    assert ql.needed_lrs(low, "adalora", lrs, 0) == [2.5e-4]  # best at the bottom: one down
    low.append(sel(2.5e-4, 0.75))
    assert ql.chosen_lr(low, "adalora", lrs, 0) == 5e-4
    table = ql.lr_selection_rows(rows, [quality.Cell("adalora", "AdaLoRA", "adalora", 8)], lrs, 0)
    assert table[0]["beyond the grid"] == "0.01: 80.00, 0.02: **90.00**"
    assert table[0]["chosen lr"] == "0.02"


def test_the_grid_runs_the_validation_runs_beyond_the_edge_before_the_test_run(tmp_path):
    cell, lrs = quality.Cell("adalora", "AdaLoRA", "adalora", 8), (2e-3, 5e-3)
    acc = {2e-3: 0.6, 5e-3: 0.7, 1e-2: 0.8, 2e-2: 0.75}  # best beyond the grid's top
    fields = ("cell", "seed", "phase", "lr", "accuracy", "eval_loss")
    Task = quality_grid.Task

    def run(task, lr, stats):
        return {"cell": task.cell.key, "seed": task.seed, "phase": task.phase,
                "lr": ql.lr_text(lr), "accuracy": acc[lr], "eval_loss": 0.5,
                "train_s": 1}  # fmt: skip

    def extra(rows):
        return [Task(cell, 0, "select", lr) for lr in ql.needed_lrs(rows, cell.key, lrs, 0)
                if lr not in lrs]  # fmt: skip

    hooks = quality_grid.Hooks(
        run=run,
        record=lambda task, lr, stats, row: common.append_row(tmp_path / "runs.csv", row, fields),
        write=lambda failed: None,
        needs_stats=lambda task: False,
        lr_for=lambda rows, t: t.lr if t.phase != "test" else ql.chosen_lr(rows, cell.key, lrs, 0),
        extra=extra,
        current=lambda rows: ql.current_rows(rows, lrs, 0),
    )
    # A test run made when 5e-3, the grid's edge, was the choice: history, run again at 1e-2.
    common.append_row(tmp_path / "runs.csv", {**run(Task(cell, 0), 5e-3, None), "phase": "test"},
                      fields)  # fmt: skip
    tasks = [Task(cell, 0, "select", lr) for lr in lrs] + [Task(cell, 0)]
    quality_grid.Grid(tmp_path, tmp_path / "work", tasks, hooks).run(jobs=1, progress=False)
    rows = common.read_rows(tmp_path / "runs.csv")
    assert [(r["phase"], r["lr"]) for r in rows] == [
        ("test", "0.005"),
        ("select", "0.002"), ("select", "0.005"), ("select", "0.01"), ("select", "0.02"),
        ("test", "0.01"),
    ]  # fmt: skip
    assert [
        (r["phase"], r["lr"]) for r in ql.current_rows(rows, lrs, 0) if r["phase"] == "test"
    ] == [("test", "0.01")]
    pending = [r for r in rows if r["lr"] != "0.02"]  # the choice waits: no current test run
    assert [r for r in ql.current_rows(pending, lrs, 0) if r["phase"] == "test"] == []
    assert ql.current_rows(rows, (), 0) == rows  # no learning-rate grid: every row counts


def test_params_from_the_plan_count_and_ranges():
    # A FlexLoRA run written before train_run reported the plan count: its plan_params wins.
    assert qs.row_params({"trainable_params": "295296", "plan_params": "147648"}) == 147648
    assert qs.row_params({"trainable_params": "221472", "plan_params": ""}) == 221472
    assert qs.params_text([73728, 67584, 73728]) == "67,584–73,728"
    assert qs.params_text([5, 5]) == "5"


def test_claims_compare_only_common_seeds():
    accs = {"lora-r8": [0.70, 0.90], "e2lora-r8": [0.71]}  # LoRA's seed 1 has no partner yet
    rows = _rows(accs, {"lora-r8": 100, "e2lora-r8": 50})
    claim = qs.claims_rows(rows, quality.CELLS)[0]
    assert claim["seeds"] == "0"
    assert claim["ours"] == "E²LoRA r=8: 71.00 vs LoRA r=8: 70.00"
    assert claim["Δ acc (pp)"] == "+1.00 (one seed: no error bar)"
    pending = qs.claims_rows(_rows({"lora-r8": [0.7]}, {"lora-r8": 1}), quality.CELLS)[0]
    assert pending["verdict"].startswith("pending")


def test_flexlora_rank_claim():
    rows = _rows({"flexlora-r8": [0.7, 0.7]}, {"flexlora-r8": 1})
    rows[0]["flex_ranks_moved"], rows[1]["flex_ranks_moved"] = "3/24", "0/24"
    claim = qs.flex_rank_claim(rows, {"flexlora-r8": "FlexLoRA"})
    assert claim["ours"] == "seed 0: 3/24 modules; seed 1: 0/24 modules"
    assert claim["verdict"] == "not held (1 of 2 runs end at r₀ everywhere)"
    rows[1]["flex_ranks_moved"] = "1/24"
    assert qs.flex_rank_claim(rows, {"flexlora-r8": "FlexLoRA"})["verdict"] == "held"
    assert qs.flex_rank_claim(rows, {"lora-r8": "LoRA"}) is None  # not in this grid


def test_flex_ranks_moved_reads_the_last_history_entry(tmp_path):
    assert qr.flex_ranks_moved(tmp_path, 8) == ""
    history = [[10, {"a": 8, "b": 8, "c": 8}], [20, {"a": 9, "b": 7, "c": 8}]]
    (tmp_path / "flex_history.json").write_text(json.dumps(history), encoding="utf-8")
    assert qr.flex_ranks_moved(tmp_path, 8) == "2/3"


@pytest.mark.parametrize(
    "kind, delta, se, n, margin, want",
    [
        ("beats", 1.0, 0.2, 3, 0, "held"),
        ("beats", 0.3, 0.2, 3, 0, "held (within noise)"),
        ("beats", -0.3, 0.2, 3, 0, "not held (within noise)"),
        ("beats", -1.0, 0.2, 3, 0, "not held"),
        ("beats", 1.0, 0.0, 1, 0, "held (within noise)"),  # one seed: never "clearly"
        ("matches", -0.4, 0.1, 3, 0, "held"),
        ("matches", -0.6, 0.1, 3, 0, "not held"),
        ("matches", -0.6, 0.4, 3, 0, "held"),
        ("matches", 0.7, 0.0, 1, 0, "held (within noise)"),
        ("matches", -0.7, 0.0, 1, 0, "not held (within noise)"),
        ("at-least", -0.4, 0.01, 3, 0.5, "held"),
        ("at-least", -0.4, 0.2, 3, 0.5, "held (within noise)"),
        ("at-least", -0.7, 0.05, 3, 0.5, "not held"),
        ("at-least", -0.1, 0.02, 3, 0.0, "not held"),
        ("at-least", 0.0, 0.0, 1, 0.0, "held (within noise)"),
        ("not-below", -0.3, 0.2, 3, 0, "held"),
        ("not-below", -0.5, 0.2, 3, 0, "not held"),
        ("not-below", 2.0, 0.0, 1, 0, "pending (needs two seeds for an error bar)"),
    ],
)
def test_verdict(kind, delta, se, n, margin, want):
    assert qs.verdict(kind, delta, se, n, margin) == want


def test_verdict_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown claim kind 'wins'; use beats, matches"):
        qs.verdict("wins", 1.0, 0.1, 3)


def test_cells_are_unique_and_valid_for_train_run():
    from entrolora.train import check_options, normalize_method

    keys = [c.key for c in quality.CELLS]
    assert len(keys) == len(set(keys))
    for cell in quality.CELLS:
        if "statistics" in cell.options or cell.method == "truncate":
            continue  # issue 14's option; the truncation control trains nothing (frontier tests)
        check_options(normalize_method(cell.method), qr.cell_options(quality.CONFIGS["cpu"], cell))
    for c in qs.CLAIMS:
        assert c.a in keys and c.b in keys
    assert set(quality.SMOKE_CELLS) <= set(keys)
    for setup in quality.CONFIGS.values():
        assert set(setup.cells) <= set(keys) and set(setup.sweep_cells) <= set(keys)


def test_statistics_cells_have_their_option():
    from entrolora.planners import planner_options
    from entrolora.train import check_options

    if "statistics" not in planner_options("e2lora"):
        pytest.skip("the planners' statistics option (issue 14) has not landed yet")
    raw = [c for c in quality.CELLS if "statistics" in c.options]
    assert {c.method for c in raw} == {"e2lora", "ralora"}
    for cell in raw:
        check_options(cell.method, cell.options)


def test_adalora_schedule_sized_to_the_steps():
    import peft

    assert qr.adalora_schedule(200) == {"tinit": 24, "tfinal": 88, "deltaT": 1}
    assert qr.adalora_schedule(50_500) == {"tinit": 6060, "tfinal": 22220, "deltaT": 101}
    cell = next(c for c in quality.CELLS if c.method == "adalora")
    opts = qr.cell_options(quality.CONFIGS["cpu"], cell)
    assert opts == qr.adalora_schedule(quality.CONFIGS["cpu"].max_steps)
    assert qr.cell_options(quality.CONFIGS["gpu"], cell) == {}  # epochs: train_run sizes it
    # peft accepts it: a budget phase is left between the initial and the final steps.
    peft.AdaLoraConfig(target_r=8, init_r=12, total_step=200, target_modules=["q"], **opts)


def test_held_out_cuts_validation_from_the_training_split_by_group():
    from entrolora.data import datasets as D

    n = 200
    ds = D.TextDataset(
        [f"t{i}" for i in range(n)], [i % 2 for i in range(n)], [f"film{i // 4}" for i in range(n)],
        ("a", "b"),
    )  # fmt: skip
    train, test = D.split(ds, 0.2, 3)
    with qr.held_out(0.25) as seen:
        fit, val = D.split(ds, 0.2, 3)
    assert D.split is not None and seen[0]["fit"] == len(fit) and seen[0]["held_out"] == len(val)
    assert sorted(fit.texts + val.texts) == sorted(train.texts)  # the test split is not in either
    assert not set(val.groups) & set(fit.groups) and not set(val.groups) & set(test.groups)
    assert len(val) == pytest.approx(0.25 * len(train), abs=4)  # whole films of 4
    assert seen[0]["majority"] == max(val.labels.count(0), val.labels.count(1)) / len(val)
    with qr.held_out(None) as seen:
        assert D.split(ds, 0.2, 3) == (train, test)  # test runs: the split is unchanged
    assert D.split(ds, 0.2, 3) == (train, test)  # restored


def test_worker_refuses_a_run_that_did_not_evaluate_on_the_given_split(tmp_path, monkeypatch):
    import entrolora.train as T

    class Result:
        output, metrics = tmp_path, {"test_examples": 5}

    monkeypatch.setattr(T, "train_run", lambda cfg: Result())  # never splits
    payload = json.dumps({"config": {"output": str(tmp_path)}, "validation": 0.15})
    with pytest.raises(
        RuntimeError, match="did not evaluate on the split bench/quality/quality.py"
    ):
        qr.worker(payload)


def test_claims_are_exclusive_and_stale_ones_removed(tmp_path):
    import subprocess
    import sys

    claims = quality_grid.Claims(tmp_path)
    assert claims.take("a", "seed0") and not claims.take("a", None)
    assert claims.live() == {"a": "seed0"}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    (tmp_path / ".claims" / "b.json").write_text(json.dumps({"pid": int(dead.stdout)}))
    assert claims.live() == {"a": "seed0"}  # b's process is gone: its claim is stale
    assert not (tmp_path / ".claims" / "b.json").exists()
    claims.release("a")
    assert claims.live() == {} and claims.take("a", None)


def test_unknown_cell_is_refused(tmp_path):
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("entrolora-bench-smoke-*"))
    with pytest.raises(ValueError, match=r"unknown cell\(s\) \['nope'\]; choose from"):
        quality.main(["--smoke", "--cells", "nope", "--results", str(tmp_path), "--quiet"])
    assert set(Path(tempfile.gettempdir()).glob("entrolora-bench-smoke-*")) == before  # no leak


def test_threads_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="--threads must be >= 1, got 0"):
        quality.main(["--smoke", "--threads", "0", "--results", str(tmp_path), "--quiet"])


def test_jobs_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="--jobs must be >= 1, got 0"):
        quality.main(["--smoke", "--jobs", "0", "--results", str(tmp_path), "--quiet"])


def test_parallel_jobs_wait_for_the_seed_statistics(tmp_path):
    """Two runs at a time, each its own process: the cosine ablation waits for the probing cell,
    reuses its statistics (gradients kept), and the runs give what the in-process grid gives."""
    cells = "e2lora-r8,e2lora-cosine,lora-r8"
    args = ["--smoke", "--lr", "2e-3", "--cells", cells, "--quiet"]
    parallel = quality.main(
        [*args, "--jobs", "2", "--threads", "1", "--results", str(tmp_path / "p")]
    )
    serial = quality.main([*args, "--results", str(tmp_path / "s")])
    rows = {r["cell"]: r for r in common.read_rows(parallel / "runs.csv")}
    assert set(rows) == set(cells.split(","))
    assert {r["phase"] for r in rows.values()} == {"test"}  # --lr: no selection runs
    assert rows["e2lora-r8"]["stats_reused"] == "False"
    assert rows["e2lora-cosine"]["stats_reused"] == "True"
    serial_rows = {r["cell"]: r for r in common.read_rows(serial / "runs.csv")}
    for cell in rows:
        for key in ("accuracy", "eval_loss", "trainable_params", "lr"):
            assert rows[cell][key] == serial_rows[cell][key], (cell, key)
    assert not list((tmp_path / "p").glob("**/.claims/*.json"))  # every claim released


def test_append_row_round_trip_and_keeps_extra_columns(tmp_path):
    path = tmp_path / "runs.csv"
    common.append_row(path, {"a": 1, "b": "x,y"}, ["a", "b"])
    common.append_row(path, {"a": 2}, ["a", "b"])
    assert common.read_rows(path) == [{"a": "1", "b": "x,y"}, {"a": "2", "b": ""}]
    common.append_row(path, {"b": "z"}, ["b"])  # column a is kept from the existing header
    assert common.read_rows(path)[-1] == {"b": "z", "a": ""}
    assert not [p for p in tmp_path.iterdir() if p.name != "runs.csv"]  # no temporary left


def test_time_steps_excludes_warmup():
    calls = []
    t = common.time_steps(calls.append, steps=4, warmup=2)
    assert calls == list(range(6))
    assert len(t.seconds) == 4
    assert t.median_ms == pytest.approx(1e3 * float(np.median(t.seconds)))


def test_time_steps_needs_a_step():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        common.time_steps(lambda i: None, steps=0, warmup=1)
    with pytest.raises(ValueError, match="warmup must be >= 0"):
        common.time_steps(lambda i: None, steps=1, warmup=-1)


def test_mean_std_against_numpy_and_empty():
    vals = [3.0, 1.5, 2.25, 8.0]
    m, s = common.mean_std(vals)
    assert (m, s) == pytest.approx((np.mean(vals), np.std(vals, ddof=1)))
    assert common.mean_std([2.0]) == (2.0, 0.0)
    with pytest.raises(ValueError, match="at least one value"):
        common.mean_std([])


def test_markdown_table_escapes_pipes():
    out = common.markdown_table([{"a": "x|y", "b": None}], ["a", "b"])
    assert out.splitlines() == ["| a | b |", "|---|---|", "| x\\|y |  |"]


def test_refresh_includes_copies_files_verbatim(tmp_path):
    (tmp_path / "t.md").write_text("| a |\n|---|\n| 1 |\n", encoding="utf-8")
    (tmp_path / "o.txt").write_text("x    y\n", encoding="utf-8")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "intro\n<!-- include: t.md -->\nstale\n<!-- end include -->\nmid\n"
        "<!-- include: o.txt -->\n<!-- end include -->\n<!-- include: none.md -->\nold\n"
        "<!-- end include -->\n",
        encoding="utf-8",
    )
    common.refresh_includes(doc, tmp_path)
    want = (
        "intro\n<!-- include: t.md -->\n| a |\n|---|\n| 1 |\n<!-- end include -->\nmid\n"
        "<!-- include: o.txt -->\n```text\nx    y\n```\n<!-- end include -->\n"
        "<!-- include: none.md -->\n*(none.md not generated yet)*\n<!-- end include -->\n"
    )
    assert doc.read_text(encoding="utf-8") == want
    common.refresh_includes(doc, tmp_path)  # idempotent
    assert doc.read_text(encoding="utf-8") == want
    (tmp_path / "t.md").write_text("new\n", encoding="utf-8")
    (tmp_path / "o.txt").write_text("new\n", encoding="utf-8")
    common.refresh_includes(doc, tmp_path, under="o.")  # only the blocks under that prefix
    assert doc.read_text(encoding="utf-8") == want.replace("x    y", "new")


def test_a_failed_run_is_reported_and_the_grid_goes_on(tmp_path, monkeypatch):
    def fake_run_cell(setup, task, lr, work, stats):
        if task.cell.key == "lora-r8":
            raise RuntimeError("lora-r8-seed0 failed (exit 1):\nboom")
        return {
            "cell": task.cell.key, "seed": task.seed, "phase": task.phase, "lr": lr,
            "accuracy": 0.5, "trainable_params": 10,
            "head_params": 2, "train_s": 1.0, "probe_s": 0.0, "peak_memory_mib": 3.0,
        }  # fmt: skip

    monkeypatch.setattr(quality, "run_cell", fake_run_cell)
    setup = quality.Setup("t", None, None, (0,), 1, None, 8, cells=("lora-r8", "lora-r4"))
    with pytest.raises(RuntimeError, match=r"1 run\(s\) failed \(rerun to retry\): lora-r8-seed0"):
        quality.run_grid(setup, tmp_path / "t", tmp_path / "w", "header", progress=False)
    assert [r["cell"] for r in common.read_rows(tmp_path / "t" / "runs.csv")] == ["lora-r4"]
    table = (tmp_path / "t" / "table.md").read_text(encoding="utf-8")
    assert (
        "Finished test runs: 1 of 2 (cells × seeds). Failed in the last invocation: lora-r8-seed0"
        in table
    )


def test_a_failed_selection_run_leaves_its_cell_without_test_runs(tmp_path, monkeypatch):
    def fake_run_cell(setup, task, lr, work, stats):
        if task.cell.key == "lora-r8" and task.phase == "select" and lr == 2e-3:
            raise RuntimeError(f"{task.name} failed (exit 1):\nboom")
        acc = 0.6 + 10 * lr if task.phase == "select" else 0.5
        return {
            "cell": task.cell.key, "seed": task.seed, "phase": task.phase, "lr": lr,
            "accuracy": acc, "eval_loss": 0.5, "trainable_params": 10, "head_params": 2,
            "train_s": 1.0, "probe_s": 0.0, "peak_memory_mib": 3.0,
        }  # fmt: skip

    monkeypatch.setattr(quality, "run_cell", fake_run_cell)
    setup = quality.Setup("t", None, None, (0, 1), 1, None, 8, lrs=(1e-3, 2e-3),
                          cells=("lora-r8", "lora-r4"), edge_steps=0)  # fmt: skip
    with pytest.raises(RuntimeError, match="3 run\\(s\\) failed") as err:
        quality.run_grid(setup, tmp_path / "t", tmp_path / "w", "header", progress=False)
    assert "lora-r8-seed0-select-lr0.002, lora-r8-seed0 (no learning rate chosen)" in str(err.value)
    rows = common.read_rows(tmp_path / "t" / "runs.csv")
    tested = [(r["cell"], r["seed"], r["lr"]) for r in rows if r["phase"] == "test"]
    assert tested == [("lora-r4", "0", "0.002"), ("lora-r4", "1", "0.002")]  # 2e-3 won
    selection = (tmp_path / "t" / "lr_selection.md").read_text(encoding="utf-8")
    assert "| LoRA r=8 | 61.00 |  |  | pending |" in selection
    assert "| LoRA r=4 | 61.00 | **62.00** |  | 0.002 |" in selection


def test_an_sft_grid_names_its_data_and_score():
    """math-cpu's tables say exact match on the shipped math set, never Rotten Tomatoes accuracy
    (the classify wording stays for the classification grids)."""
    sft, cls = quality.CONFIGS["math-cpu"], quality.CONFIGS["rt-lowbudget"]
    assert (qs.score_name(sft), qs.score_name(cls)) == ("exact match %", "accuracy %")
    text = qs.settings_text(sft)
    assert "math set" in text and "Rotten" not in text and "by film" not in text
    assert "validation exact match" in text and "own validation split" in text
    assert "Rotten Tomatoes" in qs.settings_text(cls) and "by film" in qs.settings_text(cls)
    assert "exact match % (mean ± std)" in qs.table_columns(qs.score_name(sft))

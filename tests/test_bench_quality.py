"""bench/quality.py and bench/common.py: the smoke grid runs end to end and resumes; the summary
matches a numpy computation on runs.csv; bad input is refused. No timing asserts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scripts import load_script

quality = load_script("bench/quality.py")
common = load_script("bench/common.py")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    results = tmp_path_factory.mktemp("quality-results")
    folder = quality.main(["--smoke", "--results", str(results), "--quiet"])
    return folder


def test_smoke_grid_rows_and_tables(smoke):
    rows = common.read_rows(smoke / "runs.csv")
    assert [r["cell"] for r in rows] == list(quality.SMOKE_CELLS)
    assert {r["seed"] for r in rows} == {"0"}
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0
        assert int(r["steps"]) == 2
    by_cell = {r["cell"]: r for r in rows}
    # Tiny BERT: 3 layers × 4 attention targets (32×32), LoRA r=8 has A (8×32) and B (32×8).
    assert int(by_cell["lora-r8"]["trainable_params"]) == 3 * 4 * (8 * 32 + 32 * 8)
    assert by_cell["peft-lora-r8"]["trainable_params"] == by_cell["lora-r8"]["trainable_params"]
    assert by_cell["e2lora-r8"]["stats_reused"] == "False"  # the first probing cell probes
    table = (smoke / "table.md").read_text(encoding="utf-8")
    for label in ("LoRA r=8", "E²LoRA r=8", "peft LoRA r=8"):
        assert f"| {label} |" in table
    assert "Finished runs: 3 of 3" in table
    assert "(one seed)" in table  # no ± 0.00 pretending to be an error bar
    claims = (smoke / "claims.md").read_text(encoding="utf-8")
    assert "entrolora LoRA matches peft LoRA (sanity)" in claims
    assert "pending (cells not run on a common seed yet)" in claims  # not in the smoke grid
    assert (smoke / "table.csv").is_file()
    pytest.importorskip("matplotlib")
    assert (smoke / "accuracy_vs_params.png").stat().st_size > 0


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
    summary = {s["cell"].key: s for s in quality.summarize(_rows(accs, params), cells)}
    for key, vals in accs.items():
        v = 100 * np.array(vals, dtype=np.float64)
        assert summary[key]["acc_mean"] == pytest.approx(v.mean(), abs=1e-12)
        assert summary[key]["acc_std"] == pytest.approx(v.std(ddof=1), abs=1e-12)
        assert summary[key]["train_s"] == pytest.approx(2.0)
        assert summary[key]["params"] == [params[key]] * 3
    rows = _rows(accs, params)
    claim = next(r for r in quality.claims_rows(rows) if r["claim"].startswith("E²LoRA matches"))
    d = 100 * (np.array(accs["e2lora-r8"]) - np.array(accs["lora-r8"]))  # paired by seed
    delta, se = d.mean(), d.std(ddof=1) / np.sqrt(3)
    assert claim["Δ acc (pp)"] == f"{delta:+.2f} ± {se:.2f}"
    assert claim["seeds"] == "0,1,2"
    assert claim["params ratio"] == "0.52"
    assert claim["verdict"] == "held"
    # The same accuracies with E²LoRA at 0.8× LoRA's parameters: not "about half".
    params["e2lora-r8"] = 800
    claim = quality.claims_rows(_rows(accs, params))[0]
    assert claim["verdict"] == "not held (parameter ratio 0.80 > 0.75; accuracy: held)"


def test_params_from_the_plan_count_and_ranges():
    # A FlexLoRA run written before train_run reported the plan count: its plan_params wins.
    assert quality.row_params({"trainable_params": "295296", "plan_params": "147648"}) == 147648
    assert quality.row_params({"trainable_params": "221472", "plan_params": ""}) == 221472
    assert quality.params_text([73728, 67584, 73728]) == "67,584–73,728"
    assert quality.params_text([5, 5]) == "5"


def test_claims_compare_only_common_seeds():
    accs = {"lora-r8": [0.70, 0.90], "e2lora-r8": [0.71]}  # LoRA's seed 1 has no partner yet
    rows = _rows(accs, {"lora-r8": 100, "e2lora-r8": 50})
    claim = quality.claims_rows(rows)[0]
    assert claim["seeds"] == "0"
    assert claim["ours"] == "E²LoRA r=8: 71.00 vs LoRA r=8: 70.00"
    assert claim["Δ acc (pp)"] == "+1.00 (one seed: no error bar)"
    pending = quality.claims_rows(_rows({"lora-r8": [0.7]}, {"lora-r8": 1}))[0]
    assert pending["verdict"].startswith("pending")


@pytest.mark.parametrize(
    "kind, delta, se, n, want",
    [
        ("beats", 1.0, 0.2, 3, "held"),
        ("beats", 0.3, 0.2, 3, "held (within noise)"),
        ("beats", -0.3, 0.2, 3, "not held (within noise)"),
        ("beats", -1.0, 0.2, 3, "not held"),
        ("beats", 1.0, 0.0, 1, "held (within noise)"),  # one seed: never "clearly"
        ("matches", -0.4, 0.1, 3, "held"),
        ("matches", -0.6, 0.1, 3, "not held"),
        ("matches", -0.6, 0.4, 3, "held"),
        ("matches", 0.7, 0.0, 1, "held (within noise)"),
        ("matches", -0.7, 0.0, 1, "not held (within noise)"),
    ],
)
def test_verdict(kind, delta, se, n, want):
    assert quality.verdict(kind, delta, se, n) == want


def test_cells_are_unique_and_valid_for_train_run():
    from entrolora.train import check_options, normalize_method

    keys = [c.key for c in quality.CELLS]
    assert len(keys) == len(set(keys))
    for cell in quality.CELLS:
        check_options(normalize_method(cell.method), cell.options)
    for _, a, b, _, _ in quality.CLAIMS:
        assert a in keys and b in keys
    assert set(quality.SMOKE_CELLS) <= set(keys)


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


def test_parallel_jobs_wait_for_the_seed_statistics(smoke, tmp_path):
    """Two runs at a time, each its own process: the cosine ablation waits for the probing cell,
    reuses its statistics (gradients kept), and LoRA gives what the in-process grid gave."""
    cells = "e2lora-r8,e2lora-cosine,lora-r8"
    args = ["--smoke", "--jobs", "2", "--threads", "1", "--cells", cells, "--quiet"]
    folder = quality.main([*args, "--results", str(tmp_path)])
    rows = {r["cell"]: r for r in common.read_rows(folder / "runs.csv")}
    assert set(rows) == set(cells.split(","))
    assert rows["e2lora-r8"]["stats_reused"] == "False"
    assert rows["e2lora-cosine"]["stats_reused"] == "True"
    serial = {r["cell"]: r for r in common.read_rows(smoke / "runs.csv")}
    for key in ("accuracy", "eval_loss", "trainable_params"):
        assert rows["lora-r8"][key] == serial["lora-r8"][key], key
        assert rows["e2lora-r8"][key] == serial["e2lora-r8"][key], key


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


def test_a_failed_run_is_reported_and_the_grid_goes_on(tmp_path, monkeypatch):
    def fake_run_cell(setup, cell, seed, work, stats):
        if cell.key == "lora-r8":
            raise RuntimeError("lora-r8 seed 0 failed (exit 1):\nboom")
        return {
            "cell": cell.key, "seed": seed, "accuracy": 0.5, "trainable_params": 10,
            "head_params": 2, "train_s": 1.0, "probe_s": 0.0, "peak_memory_mib": 3.0,
        }  # fmt: skip

    monkeypatch.setattr(quality, "run_cell", fake_run_cell)
    setup = quality.Setup("t", None, None, (0,), 1, None, 8, cells=("lora-r8", "lora-r4"))
    with pytest.raises(RuntimeError, match=r"1 run\(s\) failed \(rerun to retry\): lora-r8 seed 0"):
        quality.run_grid(setup, tmp_path / "t", tmp_path / "w", "header", progress=False)
    assert [r["cell"] for r in common.read_rows(tmp_path / "t" / "runs.csv")] == ["lora-r4"]
    table = (tmp_path / "t" / "table.md").read_text(encoding="utf-8")
    assert (
        "Finished runs: 1 of 2 (cells × seeds). Failed in the last invocation: lora-r8 seed 0"
        in table
    )

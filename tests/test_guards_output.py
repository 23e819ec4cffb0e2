"""The output guard (guards/output.py, issue 34): everything the program writes is resolved,
replaces only files its kind wrote, never goes into an output it does not own, and is checked for
writability and room up front; a failure after the work names where the work is kept.

Each bullet of the issue is a test (``test_issue_*``); the others are cases the issue did not
list that the same guard covers (``test_also_*``). Every test says what is left on disk.
"""

# ruff: noqa: F811  (the fixtures env and run come from test_bad_inputs)
from __future__ import annotations

import errno
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

import entrolora as el
from entrolora.guards import output as G
from entrolora.guards import staging as rf
from test_bad_inputs import BERT_TARGETS, FAST, env, invoke, refused, run, tree  # noqa: F401
from test_export_rules import build_any

TRAIN = ("train", "--method", "lora", "--r", "2", *FAST, "--target-modules",
         ",".join(BERT_TARGETS))  # fmt: skip


def train_args(env, out) -> list:
    return [*TRAIN, "--model", env["bert2"], "--data", env["csv"], "--output", out]


@pytest.fixture
def copy(run, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


# -- the issue's cases --------------------------------------------------------------------------
@pytest.mark.parametrize("sub", ["adapter", "peft"])
def test_issue_overwrite_names_a_file_added_inside_a_subfolder(env, copy, sub):
    (copy / sub / "my-notes.txt").write_text("mine")
    before = tree(copy)
    r = invoke(*train_args(env, copy), "--overwrite")
    refused(r, f"holds '{sub}/my-notes.txt', which entrolora did not write; --overwrite would "
            "delete it")  # fmt: skip
    assert tree(copy) == before  # nothing lost


def test_issue_merged_overwrite_never_replaces_a_runs_peft(copy, tmp_path):
    before = tree(copy)
    r = invoke("export", copy, "--merged", "--overwrite", "--output", copy / "peft")
    refused(r, f"output '{copy / 'peft'}' is inside '{copy}', which is an entrolora run")
    assert tree(copy) == before


def test_issue_output_symlink_and_dot_are_resolved(env, tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    r = invoke(*train_args(env, link))
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and (target / "metrics.json").is_file()  # written where it points
    here = tmp_path / "here"
    here.mkdir()
    cwd = Path.cwd()
    os.chdir(here)
    try:
        r = invoke(*train_args(env, "."))
        assert r.exit_code == 0, r.output
        assert Path.cwd() == here and (Path(".") / "metrics.json").is_file()  # the shell's folder
    finally:
        os.chdir(cwd)
    assert G.output_kind(here) == "run"


def test_issue_el_save_into_a_run_folder_is_refused(copy):
    model = build_any("plain", "llama")
    before = tree(copy)
    for folder in (copy, copy / "adapter"):
        with pytest.raises(FileExistsError, match=r"el.save: .* an entrolora run; entrolora never "
                           "edits a published output"):  # fmt: skip
            el.save(model, folder)
    assert tree(copy) == before  # plan.json and the adapter as trained


def test_issue_full_disk_refused_before_training_naming_the_path(env, tmp_path, monkeypatch):
    from entrolora.job import loop

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(G.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    trained = []
    monkeypatch.setattr(loop, "train_steps", lambda *a, **k: trained.append(1) or [])
    out = tmp_path / "out"
    r = invoke(*train_args(env, out))
    refused(r, f"not enough room for output '{out}': it needs about ")
    assert "1000 B free; free some space or choose another --output" in r.stderr
    assert trained == [] and not out.exists()


def test_issue_failure_after_training_names_the_path_and_keeps_the_run(env, tmp_path, monkeypatch):
    from entrolora.job import run as job_run

    real = job_run.write_run

    def write_then_fail(out, *a, **k):
        real(out, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "report.html"))

    monkeypatch.setattr(job_run, "write_run", write_then_fail)
    out = tmp_path / "out"
    r = invoke(*train_args(env, out))
    kept = tmp_path / f"out.unfinished-{os.getpid()}"
    refused(r, f"writing an entrolora run to '{out}' failed (No space left on device at ")
    assert f"what was written is kept in '{kept}'" in r.stderr
    assert (kept / "metrics.json").is_file() and (kept / "adapter" / "plan.json").is_file()
    assert not out.exists()


# -- cases the issue did not list: the same guard --------------------------------------------------
def test_also_export_peft_and_stats_into_a_run_are_refused(copy):
    model = build_any("plain", "llama")
    before = tree(copy)
    with pytest.raises(FileExistsError, match=r"el.export_peft: .* is inside .* entrolora run"):
        el.export_peft(model, copy / "peft")
    stats = el.GradientStats.load(copy / "stats.safetensors") if (
        copy / "stats.safetensors").exists() else None  # fmt: skip
    plan = el.AdaptationPlan.load(copy / "plan.json")
    with pytest.raises(FileExistsError, match=r"AdaptationPlan.save: .* is inside .* run"):
        plan.save(copy / "adapter" / "plan.json")
    if stats is not None:
        with pytest.raises(FileExistsError, match=r"GradientStats.save: .* is inside"):
            stats.save(copy / "stats.safetensors")
    assert tree(copy) == before


def test_also_hf_base_never_replaces_a_peft_export(run, tmp_path):
    peft_out = tmp_path / "p"
    assert invoke("export", run, "--output", peft_out).exit_code == 0
    before = tree(peft_out)
    r = invoke("export", run, "--hf-base", "--overwrite", "--output", peft_out)
    refused(r, "holds an entrolora peft export, not an entrolora merged model")
    assert tree(peft_out) == before


def test_also_a_file_added_deep_inside_a_demo_run_stops_the_overwrite(tmp_path):
    demo = tmp_path / "demo"
    with rf.OutputFolder(demo, "demo") as f:
        with rf.OutputFolder(f.path / "lora", "run") as r:
            (r.path / "metrics.json").write_text("{}")
            (r.path / "adapter").mkdir()
            (r.path / "adapter" / "plan.json").write_text("{}")
            r.publish()
        (f.path / "demo.json").write_text("{}")
        f.publish()
    marker = json.loads((demo / G.MARKER).read_text())
    assert "lora/adapter/plan.json" in marker["files"]  # the marker lists every file
    rf.check_output(demo, overwrite=True, kind="demo")  # nothing foreign: may be replaced
    (demo / "lora" / "adapter" / "keep.bin").write_bytes(b"x")
    with pytest.raises(FileExistsError, match=r"holds 'lora/adapter/keep.bin', which entrolora"):
        rf.check_output(demo, overwrite=True, kind="demo")


def test_also_legacy_run_without_file_list_checked_by_names(tmp_path):
    old = tmp_path / "old"
    (old / "adapter").mkdir(parents=True)
    (old / "metrics.json").write_text("{}")
    (old / "adapter" / "plan.json").write_text("{}")
    assert G.foreign_files(old, "run") == []
    (old / "adapter" / "draft.py").write_text("x")
    assert G.foreign_files(old, "run") == ["adapter/draft.py"]


def test_also_no_room_for_el_save_and_export_merged(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(G.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 0))
    model = build_any("plain", "llama")
    with pytest.raises(OSError, match=rf"not enough room for output '{tmp_path / 'a'}'"):
        el.save(model, tmp_path / "a")
    with pytest.raises(OSError, match=r"not enough room .* pass another folder"):
        el.export_merged(model, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_also_legacy_run_refused_but_another_programs_folder_is_not(tmp_path):
    model = build_any("plain", "llama")
    theirs = tmp_path / "project"  # another program's metrics.json and peft/ folder
    (theirs / "peft").mkdir(parents=True)
    (theirs / "metrics.json").write_text('{"loss": 0.1}')
    el.save(model, theirs / "checkpoints" / "a")  # not mistaken for an entrolora run
    legacy = tmp_path / "legacy"  # an entrolora run published before markers existed
    (legacy / "adapter").mkdir(parents=True)
    (legacy / "metrics.json").write_text('{"method": "lora", "trainable_params": 10}')
    with pytest.raises(FileExistsError, match=r"is inside .*legacy', which is an entrolora run"):
        el.save(model, legacy / "adapter" / "again")
    assert not (legacy / "adapter" / "again").exists()

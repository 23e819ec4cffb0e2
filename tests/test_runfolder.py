"""entrolora.guards.staging and entrolora.files: the one place that owns outputs. What an output
folder holds, what may be replaced, writability checked first, publish modes under the umask,
SIGTERM cleanup, sweeping dead writers' staging folders, fsync before rename. Every test says
what is left on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from entrolora import files
from entrolora.guards import staging as rf


def make_run(folder: Path, legacy: bool = False) -> Path:
    """A run folder as ``train_run`` leaves it (``legacy``: without the marker, as before)."""
    if legacy:
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text('{"method": "lora"}')
        (folder / "adapter").mkdir()
        (folder / "report.html").write_text("<html>")
        (folder / "plan.png").write_bytes(b"png")
        return folder
    with rf.OutputFolder(folder, "run") as f:
        (f.path / "metrics.json").write_text('{"method": "lora"}')
        (f.path / "adapter").mkdir()
        f.publish()
    return folder


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- what a folder holds ----------
def test_kinds_of_outputs_and_of_other_things(tmp_path):
    assert rf.output_kind(make_run(tmp_path / "new")) == "run"
    assert rf.output_kind(make_run(tmp_path / "old", legacy=True)) == "run"
    assert rf.describe(tmp_path / "old") == "an entrolora run"
    (tmp_path / "notes.txt").write_text("mine")
    assert rf.output_kind(tmp_path) is None
    assert rf.describe(tmp_path) == ("2 entrolora runs and 1 entry of other kinds ('notes.txt')")
    (tmp_path / "new" / "notes.md").write_text("added by hand")
    assert rf.output_kind(tmp_path / "new") is None
    assert rf.describe(tmp_path / "new") == (
        "an entrolora run plus 1 entry entrolora did not write ('notes.md')"
    )
    assert rf.describe(tmp_path / "missing") == "nothing"
    assert rf.describe(tmp_path / "notes.txt") == "a file entrolora did not write"


def test_marker_names_the_entries_written(tmp_path):
    out = make_run(tmp_path / "run")
    marker = json.loads((out / rf.MARKER).read_text())
    assert marker["kind"] == "run" and marker["entries"] == ["adapter", "metrics.json"]


def test_file_kinds(tmp_path):
    import torch

    from entrolora.stats import GradientStats

    grads = {f"layers.{i}.q": torch.randn(8, 8, generator=torch.Generator().manual_seed(i))
             for i in range(2)}  # fmt: skip
    stats = GradientStats.from_gradients(grads).save(tmp_path / "s.safetensors")
    assert rf.output_kind(stats) == "stats"
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"method": "lora", "lora_alpha": 8, "modules": {}}))
    assert rf.output_kind(plan) == "plan"
    other = tmp_path / "o.json"
    other.write_text('{"a": 1}')
    assert rf.output_kind(other) is None
    fake = tmp_path / "x.safetensors"
    fake.write_bytes(b"not safetensors")
    assert rf.output_kind(fake) is None
    assert listing(tmp_path) == ["o.json", "p.json", "s.safetensors", "x.safetensors"]


# -- what may be replaced ----------
def test_overwrite_never_deletes_a_folder_of_runs_and_notes(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs / "a")
    make_run(runs / "b", legacy=True)
    (runs / "notes.txt").write_text("keep me")
    before = listing(runs)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError) as e, rf.OutputFolder(runs, "run", overwrite):
            pass
        assert str(e.value) == (
            f"output {str(runs)!r} holds 2 entrolora runs and 1 entry of other kinds "
            "('notes.txt'), not an entrolora run; choose another --output (--overwrite only "
            "replaces an entrolora run)"
        )
        assert listing(runs) == before and (runs / "notes.txt").read_text() == "keep me"
    assert listing(tmp_path) == ["runs"]  # no staging folder left


def test_run_replaced_only_with_overwrite(tmp_path):
    out = make_run(tmp_path / "run")
    with pytest.raises(FileExistsError, match="already holds an entrolora run; pass --overwrite"):
        rf.check_output(out, overwrite=False)
    with rf.OutputFolder(out, "run", overwrite=True) as f:
        (f.path / "metrics.json").write_text('{"method": "e2lora"}')
        f.publish()
    assert json.loads((out / "metrics.json").read_text())["method"] == "e2lora"
    assert listing(out) == [rf.MARKER, "metrics.json"]  # the old adapter/ went with the old run
    assert listing(tmp_path) == ["run"]  # the old run's holding folder was removed


def test_other_kind_refused_even_with_overwrite(tmp_path):
    out = make_run(tmp_path / "run")
    with pytest.raises(FileExistsError, match="holds an entrolora run, not an entrolora peft"):
        rf.check_output(out, overwrite=True, kind="export")
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="is a file; choose a folder"):
        rf.check_output(f, overwrite=True)
    with pytest.raises(FileExistsError, match="holds a file entrolora did not write, not an"):
        rf.check_output(f, overwrite=True, kind="plan")
    assert f.read_text() == "x" and listing(out) == [rf.MARKER, "adapter", "metrics.json"]


def test_error_inside_leaves_the_old_output_and_no_staging(tmp_path):
    out = make_run(tmp_path / "run")
    with pytest.raises(RuntimeError, match="boom"), rf.OutputFolder(out, "run", True) as f:
        (f.path / "metrics.json").write_text("{}")
        raise RuntimeError("boom")
    assert listing(tmp_path) == ["run"]
    assert listing(out) == [rf.MARKER, "adapter", "metrics.json"]


# -- writability, before any work ----------
def test_unwritable_folder_named_before_work(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(rf.tempfile, "mkdtemp", refuse)
    out = tmp_path / "sub" / "run"
    with pytest.raises(PermissionError) as e:
        rf.check_output(out, overwrite=False)
    assert str(e.value) == (
        f"cannot write output {str(out)!r}: folder {str(tmp_path)!r} is not writable "
        "(Permission denied); choose another --output"
    )
    assert listing(tmp_path) == []  # the missing parent was not created either


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_really_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=f"cannot write output {str(ro / 'x')!r}"):
            rf.check_output(ro / "x", overwrite=False)
        assert listing(ro) == []
    finally:
        ro.chmod(0o755)


# -- modes a plain open/mkdir would give ----------
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_published_modes_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        assert files.umask() == mask
        with rf.OutputFolder(tmp_path / "run", "run") as f:
            files.atomic_write_text(f.path / "metrics.json", "{}")
            f.publish()
        lone = files.atomic_write_text(tmp_path / "plan.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "run" / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert lone.stat().st_mode & 0o777 == 0o666 & ~mask


def test_atomic_write_keeps_an_existing_files_mode(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("old")
    p.chmod(0o640)
    files.atomic_write_text(p, "new")
    assert p.read_text() == "new" and p.stat().st_mode & 0o777 == 0o640
    assert listing(tmp_path) == ["a.json"]


def test_atomic_write_fsyncs_before_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1]
    )
    files.atomic_write_text(tmp_path / "x.txt", "data")
    assert events[:2] == ["fsync", "replace"]  # file data durable before it takes the name
    assert (tmp_path / "x.txt").read_text() == "data" and listing(tmp_path) == ["x.txt"]


# -- SIGTERM and orphans ----------
SCRIPT = textwrap.dedent(
    """
    import sys, time
    from entrolora.guards.staging import OutputFolder
    with OutputFolder(sys.argv[1], "run") as f:
        (f.path / "stats.safetensors").write_text("half")
        print(f.path, flush=True)
        time.sleep(60)
        f.publish()
    """
)


def test_sigterm_removes_the_staging_folder(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(out)], stdout=subprocess.PIPE, text=True
    )
    staging = Path(proc.stdout.readline().strip())
    assert staging.is_dir() and staging.parent == tmp_path
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert listing(tmp_path) == []  # neither the run nor a half-written staging folder


def test_orphans_of_dead_writers_are_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    prefix_dead = files.staging_prefix("run").replace(f".{os.getpid()}.", f".{dead.pid}.")
    orphan = tmp_path / f"{prefix_dead}abc_123.tmp"
    orphan.mkdir()
    (orphan / "plan.json").write_text("{}")
    old_holder = tmp_path / f"{prefix_dead}xyz.old.tmp"
    old_holder.mkdir()
    mine = tmp_path / f"{files.staging_prefix('run')}live1.tmp"  # a live writer: this process
    mine.mkdir()
    other_host = tmp_path / f".run.{dead.pid}.elsewhere.q1.tmp"
    other_host.mkdir()
    unrelated = tmp_path / f".other.{dead.pid}.x.tmp"
    unrelated.mkdir()
    with rf.OutputFolder(out, "run") as f:
        f.publish()
    assert listing(tmp_path) == sorted([mine.name, other_host.name, unrelated.name, "run"])


# -- the commands use it ----------
def test_report_refuses_a_run_folder_and_needs_overwrite(tmp_path):
    import entrolora as el
    from test_cli import invoke, one_line_error
    from tiny import tiny_llama

    plan = el.plan_lora(tiny_llama(layers=1), r=2, target_modules=["q_proj"])
    plan = plan.save(tmp_path / "p.json")
    run = make_run(tmp_path / "run")
    r = invoke("report", plan, "--output", run)
    one_line_error(r, "holds an entrolora run, not an entrolora report")
    assert listing(run) == [rf.MARKER, "adapter", "metrics.json"]  # no report.html dropped in
    rep = tmp_path / "rep"
    assert invoke("report", plan, "--output", rep).exit_code == 0
    one_line_error(invoke("report", plan, "--output", rep), "already holds an entrolora report")
    assert invoke("report", plan, "--output", rep, "--overwrite").exit_code == 0
    assert (rep / "report.html").is_file()
    assert listing(tmp_path) == ["p.json", "rep", "run"]


def test_probe_checks_its_output_before_probing(tmp_path, monkeypatch):
    import entrolora.job as job
    from test_cli import invoke, one_line_error

    monkeypatch.setattr(job, "load_splits", lambda *a: pytest.fail("work started"))
    notes = tmp_path / "notes.safetensors"
    notes.write_bytes(b"mine")
    r = invoke("probe", "--output", notes, "--overwrite")
    one_line_error(r, "holds a file entrolora did not write, not an entrolora statistics file")
    assert notes.read_bytes() == b"mine" and listing(tmp_path) == ["notes.safetensors"]


def test_file_output_sweeps_dead_writers_temporary_files(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prefix = files.staging_prefix("s.safetensors").replace(f".{os.getpid()}.", f".{dead.pid}.")
    orphan = tmp_path / f"{prefix}k2j4_x9a.tmp"  # what mkstemp in atomic_write names
    orphan.write_bytes(b"half a file")
    assert rf.check_output(tmp_path / "s.safetensors", False, "stats") == tmp_path / "s.safetensors"
    assert listing(tmp_path) == []

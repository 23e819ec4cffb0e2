"""The one place that owns output paths: what an existing output holds, whether it may be
replaced, whether it can be written, and publishing it whole.

A folder output (run, demo, export, report) is written into a hidden staging folder next to it,
``.<name>.<pid>.<host>.<random>.tmp``, and renamed onto the output at the end, so that nothing is
ever half-written. An existing output is replaced only with ``overwrite`` *and* only when it is
an entrolora output of the same kind holding nothing else: ``--output runs --overwrite`` on a
folder of runs and notes is refused. Published folders carry ``.entrolora-output.json`` (kind and
entries) so that a later overwrite can tell; folders written before it are recognised by their
files. File outputs (stats, plan) are written atomically by their ``save``; ``check`` guards them.

Writability is checked before any work starts, with the user's path in the message. SIGTERM
(``timeout``, Slurm, ``docker stop``) becomes ``SystemExit(143)`` while a staging folder is open,
so it is removed as on Ctrl-C; staging folders left by dead processes of this host are swept.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..files import fsync_dir, publish_mode, staging_prefix

MARKER = ".entrolora-output.json"
RUN_MARKER = "metrics.json"
FOLDER_KINDS = ("run", "demo", "export", "report")
FILE_KINDS = ("stats", "plan")
KIND_NAMES = {
    "run": "an entrolora run", "demo": "an entrolora demo", "export": "an entrolora peft export",
    "report": "an entrolora report", "stats": "an entrolora statistics file",
    "plan": "an entrolora plan file",
}  # fmt: skip
# entries of folders written before the marker existed, by kind (``*.png``: report figures)
_LEGACY = {
    "run": ({"metrics.json"}, {"metrics.json", "train_loss.json", "stats.safetensors",
            "plan.json", "adapter", "peft", "flex_history.json", "report.html"}),
    "demo": ({"demo.json"}, {"demo.json", "report.html"}),
    "export": ({"adapter_config.json", "adapter_model.safetensors"},
               {"adapter_config.json", "adapter_model.safetensors", "README.md"}),
    "report": ({"report.html"}, {"report.html"}),
}  # fmt: skip


# -- what a path holds ----------------------------------------------------------------------------
def output_kind(path: Path) -> str | None:
    """The kind of entrolora output ``path`` is (``run``, ``demo``, ...) when it holds nothing
    else; None otherwise."""
    kind, extras = _classify(path)
    return None if extras else kind


def _classify(path: Path) -> tuple[str | None, list[str]]:
    """``(kind it looks like, entries that kind does not write)`` of a file or folder."""
    if path.is_file():
        return _file_kind(path), []
    if not path.is_dir():
        return None, []
    entries = {p.name for p in path.iterdir()}
    marker = _read_marker(path)
    if marker is not None and marker.get("kind") in FOLDER_KINDS:
        return marker["kind"], sorted(entries - {MARKER} - set(marker.get("entries", [])))
    for kind, (needed, allowed) in _LEGACY.items():
        if not needed <= entries:
            continue
        extra = {e for e in entries - allowed if not e.endswith(".png")}
        if kind == "demo":  # a demo holds one run folder per method
            extra = {e for e in extra if output_kind(path / e) != "run"}
        return kind, sorted(extra)
    return None, sorted(entries)


def describe(path: Path) -> str:
    """What ``path`` holds, in words: ``"an entrolora run"``, ``"2 entrolora runs and 1 other
    entry ('notes.txt')"``, ``"an entrolora run plus 1 entry entrolora did not write (...)"``."""
    kind, extras = _classify(path)
    if path.is_file():
        return KIND_NAMES[kind] if kind else "a file entrolora did not write"
    if not path.is_dir() or not any(path.iterdir()):
        return "nothing"
    if kind is not None:
        if not extras:
            return KIND_NAMES[kind]
        return f"{KIND_NAMES[kind]} plus {_count(extras, 'entrolora did not write')}"
    parts: dict[str, int] = {}
    others = []
    for p in sorted(path.iterdir()):
        k = output_kind(p)
        if k is None:
            others.append(p.name)
        else:
            parts[k] = parts.get(k, 0) + 1
    words = [f"{n} entrolora {k}{'s' if n > 1 else ''}" for k, n in parts.items()]
    if others:
        words.append(_count(others, "of other kinds" if parts else "entrolora did not write"))
    return " and ".join(words)


def _count(names: list[str], what: str) -> str:
    shown = ", ".join(repr(o) for o in names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} {'entry' if len(names) == 1 else 'entries'} {what} ({shown})"


def _read_marker(path: Path) -> dict | None:
    try:
        data = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _file_kind(path: Path) -> str | None:
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return "plan" if isinstance(data, dict) and {"method", "modules"} <= set(data) else None
    if path.suffix == ".safetensors":
        from ..stats import FORMAT

        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # not a safetensors file at all: not ours
            return None
        return "stats" if meta.get("format") == FORMAT else None
    return None


# -- may it be written? ---------------------------------------------------------------------------
def check_output(output: str | os.PathLike, overwrite: bool, kind: str = "run") -> Path:
    """``output`` as a Path once it may be written: FileExistsError when it holds something that
    must not be replaced, PermissionError when it cannot be written (checked by creating and
    removing a staging entry where it would go). For a file output, dead writers' temporary
    files are swept (``OutputFolder`` does it for folders)."""
    out = Path(output)
    want = KIND_NAMES[kind]
    folder = kind in FOLDER_KINDS
    if folder and out.is_file():
        raise FileExistsError(f"output {str(out)!r} is a file; choose a folder with --output")
    if not folder and out.is_dir():
        raise FileExistsError(f"output {str(out)!r} is a folder; choose a file with --output")
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        if output_kind(out) != kind:
            raise FileExistsError(
                f"output {str(out)!r} holds {describe(out)}, not {want}; choose another "
                f"--output (--overwrite only replaces {want})"
            )
        if not overwrite:
            raise FileExistsError(
                f"output {str(out)!r} already holds {want}; pass --overwrite to replace it or "
                "choose another --output"
            )
    check_writable(out)
    if not folder:  # a file is written by its own save (atomic_write): sweep for it here
        sweep_orphans(out)
    return out


def check_writable(out: Path) -> None:
    """PermissionError naming ``out`` when its folder (or the nearest existing ancestor, where
    the missing folders would be made) does not let us create an entry."""
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    try:
        probe = tempfile.mkdtemp(prefix=staging_prefix(out.name), suffix=".tmp", dir=anc)
    except OSError as e:
        raise PermissionError(
            f"cannot write output {str(out)!r}: folder {str(anc)!r} is not writable "
            f"({e.strerror or e}); choose another --output"
        ) from None
    os.rmdir(probe)


def sweep_orphans(output: Path) -> list[Path]:
    """Remove staging entries of ``output`` left by processes of this host that are dead
    (killed with SIGKILL, or a crash); returns what was removed."""
    parent = output.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(
        re.escape(f".{output.name}.") + r"(\d+)\.([A-Za-z0-9-]+)\.[A-Za-z0-9_]+(\.old)?\.tmp$"
    )
    host = staging_prefix("x").split(".")[3]
    removed = []
    for p in parent.iterdir():
        m = pattern.match(p.name)
        if m is None or m.group(2) != host or _alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """While inside: SIGTERM raises ``SystemExit(143)`` so that ``finally``/``with`` cleanup
    runs as on Ctrl-C. Only where SIGTERM still has its default action (a handler the program
    installed is left alone) and only in the main thread (where Python runs handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# -- writing it whole -----------------------------------------------------------------------------
class OutputFolder:
    """A folder output written whole: ``with OutputFolder(out, "run", overwrite) as f:`` checks
    ``out`` (``check_output``), sweeps orphans and creates the staging folder ``f.path``; write
    into it, then ``f.publish()`` renames it onto ``out`` (replacing an allowed old one). Leaving
    the block without publishing (error, Ctrl-C, SIGTERM) removes the staging folder."""

    def __init__(self, output: str | os.PathLike, kind: str = "run", overwrite: bool = False):
        if kind not in FOLDER_KINDS:
            raise ValueError(f"unknown folder kind {kind!r}; one of {', '.join(FOLDER_KINDS)}")
        self.output, self.kind, self.overwrite = Path(output), kind, overwrite
        self.path: Path | None = None
        self._signals: contextlib.ExitStack | None = None

    def __enter__(self) -> OutputFolder:
        out = check_output(self.output, self.overwrite, self.kind)
        sweep_orphans(out)
        self._signals = contextlib.ExitStack()
        self._signals.enter_context(terminate_as_exit())
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            prefix = staging_prefix(out.name)
            self.path = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=out.parent))
        except BaseException:
            self._signals.close()
            raise
        return self

    def publish(self) -> Path:
        """Rename the staging folder onto the output (modes as ``mkdir`` would give)."""
        if self.path is None:
            raise RuntimeError("OutputFolder.publish() outside its with-block")
        check_output(self.output, self.overwrite, self.kind)  # it may have changed meanwhile
        entries = sorted(p.name for p in self.path.iterdir())
        marker = {"kind": self.kind, "entries": entries, "host": socket.gethostname()}
        (self.path / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        publish_mode(self.path, folder=True)
        old = None
        if self.output.exists():  # empty, or an output of this kind we may replace
            prefix = staging_prefix(self.output.name)
            old = Path(tempfile.mkdtemp(prefix=prefix, suffix=".old.tmp", dir=self.output.parent))
            os.replace(self.output, old)
        os.replace(self.path, self.output)
        self.path = None
        fsync_dir(self.output.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.output

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)
                self.path = None
        finally:
            if self._signals is not None:
                self._signals.close()

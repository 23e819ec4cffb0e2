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
from .output import (  # noqa: F401  (re-exported: the guard's names)
    FILE_KINDS,
    FOLDER_KINDS,
    KIND_NAMES,
    MARKER,
    OutputError,
    check_room,
    check_writable,
    describe,
    enclosing_output,
    files_under,
    foreign_files,
    output_kind,
    resolve,
)

RUN_MARKER = "metrics.json"


# -- may it be written? ---------------------------------------------------------------------------
def check_output(
    output: str | os.PathLike, overwrite: bool, kind: str = "run", nbytes: int | None = None
) -> Path:
    """``output``, resolved (``guards.output.resolve``), once it may be written.

    FileExistsError when it holds something that must not be replaced: another kind of output,
    the same kind without ``overwrite``, a file its kind did not write anywhere inside it (named),
    or when it lies inside another entrolora output (a run's ``peft/``); PermissionError when it
    cannot be written (checked by creating and removing a staging entry where it would go);
    ``OutputError`` when ``nbytes`` are known and do not fit. For a file output, dead writers'
    temporary files are swept (``OutputFolder`` does it for folders). Messages name the path as
    typed."""
    shown = os.fspath(output)
    out = resolve(output)
    want = KIND_NAMES[kind]
    folder = kind in FOLDER_KINDS
    if folder and out.is_file():
        raise FileExistsError(f"output {shown!r} is a file; choose a folder with --output")
    if not folder and out.is_dir():
        raise FileExistsError(f"output {shown!r} is a folder; choose a file with --output")
    owner = enclosing_output(out)
    if owner is not None:
        raise FileExistsError(
            f"output {shown!r} is inside {str(owner[0])!r}, which is {KIND_NAMES[owner[1]]}; "
            f"entrolora never writes into an output it did not make: choose a --output outside it"
        )
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        if output_kind(out) != kind:
            raise FileExistsError(
                f"output {shown!r} holds {describe(out)}, not {want}; choose another "
                f"--output (--overwrite only replaces {want})"
            )
        if not overwrite:
            raise FileExistsError(
                f"output {shown!r} already holds {want}; pass --overwrite to replace it or "
                "choose another --output"
            )
        foreign = foreign_files(out, kind) if folder else []
        if foreign:
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            raise FileExistsError(
                f"output {shown!r} holds {foreign[0]!r}{more}, which entrolora did not write; "
                "--overwrite would delete it: move it out, or choose another --output"
            )
    check_writable(out, shown)
    if nbytes is not None:
        check_room(out, nbytes, shown)
    if not folder:  # a file is written by its own save (atomic_write): sweep for it here
        sweep_orphans(out)
    return out


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
    the block without publishing (error, Ctrl-C, SIGTERM) removes the staging folder; a write
    that fails once the work is done goes through ``f.failed(e)``, which keeps what was written
    under a visible name and says where."""

    def __init__(self, output: str | os.PathLike, kind: str = "run", overwrite: bool = False):
        if kind not in FOLDER_KINDS:
            raise ValueError(f"unknown folder kind {kind!r}; one of {', '.join(FOLDER_KINDS)}")
        self.shown, self.kind, self.overwrite = os.fspath(output), kind, overwrite
        self.output = Path(output)
        self.path: Path | None = None
        self._signals: contextlib.ExitStack | None = None

    def __enter__(self) -> OutputFolder:
        self.output = check_output(self.shown, self.overwrite, self.kind)  # resolved
        out = self.output
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
        """Rename the staging folder onto the output (modes as ``mkdir`` would give); the marker
        lists every file, so that a later overwrite knows what it may delete."""
        if self.path is None:
            raise RuntimeError("OutputFolder.publish() outside its with-block")
        check_output(self.shown, self.overwrite, self.kind)  # it may have changed meanwhile
        entries = sorted(p.name for p in self.path.iterdir())
        marker = {"kind": self.kind, "entries": entries, "files": files_under(self.path),
                  "host": socket.gethostname()}  # fmt: skip
        (self.path / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        publish_mode(self.path, folder=True)
        try:
            if _holds_cwd(self.output):
                self._publish_in_place()
            else:
                self._publish_by_rename()
        except OSError as e:
            raise self.failed(e) from None
        self.path = None
        fsync_dir(self.output.parent)
        return self.output

    def _publish_by_rename(self) -> None:
        old = None
        if self.output.exists():  # empty, or an output of this kind we may replace
            prefix = staging_prefix(self.output.name)
            old = Path(tempfile.mkdtemp(prefix=prefix, suffix=".old.tmp", dir=self.output.parent))
            os.replace(self.output, old)
        try:
            os.replace(self.path, self.output)
        except OSError:
            if old is not None:  # put the old output back
                os.replace(old, self.output)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _publish_in_place(self) -> None:
        """The output is (or holds) the working folder (``--output .``): renaming it away would
        leave the shell in a deleted folder, so its old files (all this kind's, checked) are
        removed and the new entries moved in, the marker last."""
        for p in self.output.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        for p in sorted(self.path.iterdir(), key=lambda q: q.name == MARKER):
            os.replace(p, self.output / p.name)
        os.rmdir(self.path)

    def failed(self, e: BaseException) -> BaseException:
        """The error to raise when writing or publishing failed after the work: the staging
        folder is kept under a visible name next to the output and the message names both.
        Nothing written yet (a guard refused up front): ``e`` itself."""
        if self.path is None or not self.path.exists() or not any(self.path.iterdir()):
            return e
        err = getattr(e, "errno", None) or 0
        what = getattr(e, "strerror", None) or str(e)
        at = f" at {e.filename!r}" if getattr(e, "filename", None) else ""
        kept = ""
        if self.path is not None and self.path.exists():
            keep = self.output.with_name(f"{self.output.name}.unfinished-{os.getpid()}")
            try:
                os.replace(self.path, keep)
                self.path = None
                kept = f"; what was written is kept in {str(keep)!r}"
            except OSError:
                kept = f"; what was written is kept in {str(self.path)!r}"
                self.path = None
        return OutputError(
            err,
            f"writing {KIND_NAMES[self.kind]} to {self.shown!r} failed ({what}{at}){kept}; "
            "free some space or fix the folder, then move it into place or run again",
        )

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)
                self.path = None
        finally:
            if self._signals is not None:
                self._signals.close()


def _holds_cwd(folder: Path) -> bool:
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return False
    return cwd == folder or folder in cwd.parents

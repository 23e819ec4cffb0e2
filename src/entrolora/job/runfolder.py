"""Output folders: refuse to replace what must not be replaced, stage the work in a hidden
folder next to the output, and publish it with one rename, so that nothing is half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

RUN_MARKER = "metrics.json"


def holds_run(path: Path) -> bool:
    """True when ``path`` is a file or a non-empty folder (something we must not overwrite)."""
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def check_output(output: str | os.PathLike, overwrite: bool) -> Path:
    """The output folder; FileExistsError when it already holds something and not ``overwrite``."""
    out = Path(output)
    if out.is_file():
        raise FileExistsError(f"output {str(out)!r} is a file; choose a folder with --output")
    if holds_run(out) and not overwrite:
        raise FileExistsError(
            f"output folder {str(out)!r} already holds a run; pass --overwrite to replace it "
            "or choose another --output"
        )
    return out


class Staging:
    """A temporary folder next to ``output``; ``publish()`` renames it onto ``output``.

    As a context manager it discards the folder on any error, unless published.
    """

    def __init__(self, output: Path, overwrite: bool):
        self.output = output
        self.overwrite = overwrite
        output.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(
            tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
        )

    def publish(self) -> Path:
        check_output(self.output, self.overwrite)
        old = None
        if self.output.exists():
            old = self.output.with_name(f".{self.output.name}.old-{os.getpid()}")
            os.replace(self.output, old)
        os.replace(self.path, self.output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.output

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.discard()  # a no-op after publish(): the folder was renamed away

"""Atomic file writes: a reader never sees half a file (write a temporary file in the same
folder, fsync it, then rename it over the destination), published with the mode a plain
``open`` would have given (``mkstemp`` makes 0600 files, ``mkdtemp`` 0700 folders). Figures
are written the same way (``save_png``)."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once (the standard idiom)
    os.umask(mask)
    return mask


def publish_mode(path: str | os.PathLike, folder: bool = False, like: Path | None = None) -> None:
    """Give ``path`` the mode ``open``/``mkdir`` would have: 0666/0777 less the umask, or the
    mode of ``like`` (the file it replaces: ``open(path, "w")`` keeps an existing file's mode)."""
    if like is not None and like.exists() and like.is_dir() == folder:
        mode = stat.S_IMODE(like.stat().st_mode)
    else:
        mode = (0o777 if folder else 0o666) & ~umask()
    os.chmod(path, mode)


def staging_prefix(name: str) -> str:
    """``.<name>.<pid>.<host>.``: the prefix of this process's temporary siblings of ``name``
    (the pid and host let ``sweep_orphans`` tell a dead writer's leftovers from a live one's)."""
    host = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname()) or "host"
    return f".{name}.{os.getpid()}.{host}."


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file to disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync, give the file its ``open`` mode, rename onto ``path``.

    The temporary file lives in the destination folder so that the rename is atomic; it is
    removed on any error (and on SIGTERM under the CLI, which turns it into an exception).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=staging_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        publish_mode(tmp, like=path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | os.PathLike, dpi: int = 110, tight: bool = True) -> Path:
    """Write ``fig`` to ``path`` as a PNG atomically (``tight``: ``tight_layout`` first), close
    it whatever happens; returns the path."""
    try:
        if tight:
            fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        pyplot().close(fig)
    return Path(path)

"""The output guard: every path the program writes passes here before anything is written.

It resolves the path (symlinks, ``.``, ``..``, ``~``) so that the checks and the writes see the
same folder; knows every file each kind of output writes, down to the files inside its
sub-folders, so that an overwrite deletes nothing else (anything else stops it, named); refuses
to write into an entrolora output it does not own (``el.save`` into a run's folder, a
``--merged`` export onto a run's ``peft/``); and checks up front that the destination can be
written and, where the size is known, that the disk has room, naming the path.

Kinds: ``run``, ``demo``, ``export`` (a peft checkpoint), ``merged`` (a full model folder),
``report`` (folders, published by ``staging.OutputFolder`` with a ``.entrolora-output.json``
marker listing every file), ``stats`` and ``plan`` (files). Folders written before the marker
listed every file are recognised by the names their kind writes.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..files import staging_prefix

MARKER = ".entrolora-output.json"
FOLDER_KINDS = ("run", "demo", "export", "merged", "report")
FILE_KINDS = ("stats", "plan")
#: The statistics file's format tag (stats/file.py writes it; named here, below stats)
STATS_FORMAT = "entrolora.stats"
KIND_NAMES = {
    "run": "an entrolora run", "demo": "an entrolora demo", "export": "an entrolora peft export",
    "merged": "an entrolora merged model", "report": "an entrolora report",
    "stats": "an entrolora statistics file", "plan": "an entrolora plan file",
}  # fmt: skip
_PEFT = ("adapter_config.json", "adapter_model.safetensors", "README.md")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
              "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model",
              "chat_template.jinja", "chat_template.json")  # fmt: skip
#: every file each kind writes (fnmatch patterns on paths relative to the folder); a demo holds
#: one run per method in a sub-folder
WRITES: dict[str, tuple[str, ...]] = {
    "run": ("metrics.json", "train_loss.json", "stats.safetensors", "plan.json",
            "flex_history.json", "report.html", "*.png", "adapter/adapter.safetensors",
            "adapter/plan.json", "adapter/flex_state.json", "adapter/head.safetensors",
            *(f"peft/{f}" for f in _PEFT)),
    "demo": ("demo.json", "report.html", "*.png"),
    "export": _PEFT,
    "merged": ("config.json", "generation_config.json", "model.safetensors",
               "model-*-of-*.safetensors", "model.safetensors.index.json", *_TOKENIZER),
    "report": ("report.html", "*.png"),
}  # fmt: skip
# the files that identify a folder of each kind written before the marker existed
_NEEDS = {
    "run": {"metrics.json"}, "demo": {"demo.json"},
    "export": {"adapter_config.json", "adapter_model.safetensors"},
    "merged": {"config.json"}, "report": {"report.html"},
}  # fmt: skip


class OutputError(OSError):
    """An output cannot be written (no room, a failed write after the work): the message names
    the path and what is left where."""


# -- where it goes ---------------------------------------------------------------------------------
def resolve(path: str | os.PathLike) -> Path:
    """The absolute path ``path`` stands for: ``~`` expanded, symlinks and ``.``/``..`` resolved
    (so that ``--output .`` and ``--output link`` write where they point, not onto the link)."""
    out = Path(os.path.expanduser(os.fspath(path))).resolve()
    if out == out.parent:
        raise ValueError(f"output {str(path)!r} is the file-system root; choose a folder")
    return out


# -- what a path holds -----------------------------------------------------------------------------
def read_marker(path: Path) -> dict | None:
    """The ``.entrolora-output.json`` of folder ``path`` (None when absent or unreadable)."""
    try:
        data = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def marker_kind(marker: dict) -> str | None:
    """The kind a marker names (a merged model once published as ``export`` is ``merged``)."""
    kind = marker.get("kind")
    entries = marker.get("entries", ())
    if kind == "export" and "config.json" in entries and "adapter_config.json" not in entries:
        return "merged"
    return kind if kind in FOLDER_KINDS else None


def classify(path: Path) -> tuple[str | None, list[str]]:
    """``(kind it looks like, top-level entries that kind does not write)`` of a path."""
    if path.is_file():
        return file_kind(path), []
    if not path.is_dir():
        return None, []
    entries = {p.name for p in path.iterdir()}
    marker = read_marker(path)
    if marker is not None and marker_kind(marker) is not None:
        listed = set(marker.get("entries", [])) | {f.split("/")[0] for f in marker.get("files", [])}
        return marker_kind(marker), sorted(entries - {MARKER} - listed)
    for kind, needed in _NEEDS.items():
        if not needed <= entries:
            continue
        tops = {w.split("/")[0] for w in WRITES[kind]}
        extra = {e for e in entries if not any(fnmatch.fnmatch(e, w) for w in tops)}
        if kind == "demo":  # a demo holds one run folder per method
            extra = {e for e in extra if output_kind(path / e) != "run"}
        return kind, sorted(extra)
    return None, sorted(entries)


def output_kind(path: Path) -> str | None:
    """The kind of entrolora output ``path`` is when it holds nothing else; None otherwise."""
    kind, extras = classify(path)
    return None if extras else kind


def describe(path: Path) -> str:
    """What ``path`` holds, in words: ``"an entrolora run"``, ``"2 entrolora runs and 1 entry of
    other kinds ('notes.txt')"``, ``"an entrolora run plus 1 entry entrolora did not write"``."""
    kind, extras = classify(path)
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


def file_kind(path: Path) -> str | None:
    """``plan`` or ``stats`` for a file entrolora writes; None for anything else."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return "plan" if isinstance(data, dict) and {"method", "modules"} <= set(data) else None
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # not a safetensors file at all: not ours
            return None
        return "stats" if meta.get("format") == STATS_FORMAT else None
    return None


def files_under(folder: Path) -> list[str]:
    """Every file (and symlink, and empty folder) under ``folder``, as sorted relative paths:
    what deleting ``folder`` would delete."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            out.append((rel / name).as_posix())
        if not dirs and not files and rel != Path("."):
            out.append(rel.as_posix() + "/")
    return sorted(out)


def _written_by(kind: str, rel: str) -> bool:
    """Whether ``kind`` writes the file ``rel`` (a path relative to the output)."""
    if rel == MARKER or any(fnmatch.fnmatch(rel, w) for w in WRITES[kind]):
        return True
    if kind == "demo" and "/" in rel:  # demo/<method>/<a run's file>
        return _written_by("run", rel.split("/", 1)[1])
    return False


def foreign_files(folder: Path, kind: str) -> list[str]:
    """The files under ``folder`` that an output of ``kind`` did not write: those its marker
    does not list, or (folders published before markers listed every file) whose names
    ``kind`` never writes. Replacing ``folder`` would delete them."""
    present = files_under(folder)
    marker = read_marker(folder)
    if marker is not None and isinstance(marker.get("files"), list):
        listed = set(marker["files"]) | {MARKER}
        return [f for f in present if f not in listed]
    tops = set(marker.get("entries", [])) if marker else set()
    return [f for f in present if f not in tops and not _written_by(kind, f)]


def enclosing_output(path: Path, include_self: bool = False) -> tuple[Path, str] | None:
    """``(folder, kind)`` of the nearest entrolora output folder holding ``path`` (an ancestor,
    or ``path`` itself with ``include_self``): a published folder (marker) or a run or demo
    written before markers existed. ``path`` is resolved."""
    start = path if include_self else path.parent
    mine = f".{os.getpid()}."
    for folder in (start, *start.parents):
        if folder.name.startswith(".") and mine in folder.name and folder.name.endswith(".tmp"):
            return None  # this process's staging folder: everything in it is ours
        if not folder.is_dir():
            continue
        marker = read_marker(folder)
        if marker is not None and marker_kind(marker) is not None:
            return folder, marker_kind(marker)
        if _json_keys(folder / "demo.json") >= {"methods", "config"}:
            return folder, "demo"
        if _json_keys(folder / "metrics.json") >= {"method", "trainable_params"} and (
            (folder / "adapter").is_dir() or (folder / "peft").is_dir()
        ):
            return folder, "run"
    return None


def _json_keys(path: Path) -> set[str]:
    """The top-level keys of a JSON object file (empty when absent or not one): an entrolora
    ``metrics.json`` is told from another program's by its keys, not its name alone."""
    if not path.is_file():
        return set()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return set(data) if isinstance(data, dict) else set()


# -- may it be written? ----------------------------------------------------------------------------
def check_writable(
    out: Path, shown: str | None = None, fix: str = "choose another --output"
) -> None:
    """PermissionError naming ``out`` (as ``shown``) when its folder, or the nearest existing
    ancestor where missing folders would be made, does not let us create an entry."""
    shown = str(out) if shown is None else shown
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    try:
        probe = tempfile.mkdtemp(prefix=staging_prefix(out.name), suffix=".tmp", dir=anc)
    except OSError as e:
        raise PermissionError(
            f"cannot write output {shown!r}: folder {str(anc)!r} is not writable "
            f"({e.strerror or e}); {fix}"
        ) from None
    os.rmdir(probe)


#: room kept free beyond an output's own size (file-system metadata, logs of other programs)
ROOM_MARGIN = 16 * 2**20


def check_room(
    out: Path, nbytes: int, shown: str | None = None, fix: str = "choose another --output"
) -> None:
    """OutputError naming ``out`` when the file system it goes to has less than ``nbytes``
    (plus ``ROOM_MARGIN``) free."""
    anc = out
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    free = shutil.disk_usage(anc).free
    if free < nbytes + ROOM_MARGIN:
        shown = str(out) if shown is None else shown
        raise OutputError(
            errno.ENOSPC,
            f"not enough room for output {shown!r}: it needs about {human_bytes(nbytes)} and "
            f"{str(anc)!r} has {human_bytes(free)} free; free some space or {fix}",
        )


def human_bytes(n: float) -> str:
    """``2_000_000_000`` → ``"1.9 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def guard_folder(
    directory: str | os.PathLike, writer: str, kind: str | None = None, nbytes: int | None = None
) -> Path:
    """The resolved folder a Python-API writer (``el.save``, ``el.export_peft``, ...) may write
    into: not a file, not inside (or itself) an entrolora output of another kind (a run, a
    demo, a report: published outputs are replaced whole by the command line, never edited),
    writable, and with room for ``nbytes`` when given. Errors name ``writer`` and the path."""
    shown = os.fspath(directory)
    out = resolve(directory)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{writer}: {shown!r} is a file, not a folder; pass a folder")
    owner = enclosing_output(out, include_self=True)
    if owner is not None and not (owner[0] == out and owner[1] == kind):
        folder, okind = owner
        where = "is" if folder == out else f"is inside {str(folder)!r}, which is"
        raise FileExistsError(
            f"{writer}: {shown!r} {where} {KIND_NAMES[okind]}; entrolora never edits a "
            "published output (it would replace that output's files): write to another folder"
        )
    fix = "pass another folder"
    check_writable(out / "x", shown, fix)
    if nbytes is not None:
        check_room(out, nbytes, shown, fix)
    return out


def guard_file(path: str | os.PathLike, writer: str, nbytes: int | None = None) -> Path:
    """The resolved file a Python-API writer (``GradientStats.save``, ``AdaptationPlan.save``)
    may write: not a folder, not inside an entrolora output folder, writable, with room."""
    shown = os.fspath(path)
    out = resolve(path)
    if out.is_dir():
        raise FileExistsError(f"{writer}: {shown!r} is a folder; pass a file name")
    owner = enclosing_output(out)
    if owner is not None:
        raise FileExistsError(
            f"{writer}: {shown!r} is inside {str(owner[0])!r}, which is {KIND_NAMES[owner[1]]}; "
            "entrolora never edits a published output: write to another path"
        )
    check_writable(out, shown, "pass another path")
    if nbytes is not None:
        check_room(out, nbytes, shown, "pass another path")
    return out


def tensor_bytes(tensors: dict) -> int:
    """Bytes a dict of tensors takes on disk (safetensors: the raw data plus a small header)."""
    return sum(t.numel() * t.element_size() for t in tensors.values()) + 4096

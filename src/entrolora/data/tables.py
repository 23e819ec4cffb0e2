"""Reading a table of examples: CSV/TSV, JSON Lines or Parquet (text formats also .gz/.bz2).

``read_table(path) -> (columns, rows)``; every failure is one error naming the file and the fix:
a byte-order mark is ignored, a file of another encoding, a semicolon-separated "CSV", one JSON
array instead of JSON Lines or a damaged compressed file are named as such.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".pq")


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is dropped instead of becoming an
    # invisible part of the first column's name; files without one read the same.
    if path.suffix == ".bz2":
        return io.TextIOWrapper(bz2.open(path), encoding="utf-8-sig", newline="")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _format(path: Path) -> str:
    name = path.name.lower()
    for comp in (".bz2", ".gz"):
        if name.endswith(comp):
            name = name[: -len(comp)]
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return {".pq": ".parquet", ".json": ".jsonl"}.get(suffix, suffix)
    raise ValueError(
        f"cannot tell the format of {path.name!r}; use a file ending in "
        f"{', '.join(SUFFIXES)} (optionally .gz/.bz2 for text formats)"
    )


def read_table(path: str | os.PathLike) -> tuple[list[str], list[dict[str, Any]]]:
    """``(column names, rows)`` of a CSV/TSV, JSON Lines or Parquet file.

    Every failure is a ValueError (FileNotFoundError when absent) naming the file and the fix.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--data {str(path)!r} is a folder; pass a CSV/TSV/JSONL/Parquet file")
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; check --data")
    fmt = _format(path)
    if fmt == ".parquet":
        return _read_parquet(path)
    try:
        with _open_text(path) as f:
            if fmt in (".csv", ".tsv"):
                return _read_delimited(path, f, fmt)
            return _read_jsonl(path, f)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"data file {str(path)!r} is not UTF-8 text (byte {e.start}); save it as UTF-8"
        ) from None
    except (OSError, EOFError) as e:  # a corrupted or truncated .gz / .bz2
        raise ValueError(f"data file {str(path)!r} cannot be read ({e}); check the file") from None


def _read_parquet(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            "reading Parquet needs pyarrow; run `pip install 'entrolora[data]'`"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid & co. for a damaged file
        raise ValueError(
            f"data file {str(path)!r} is not a readable Parquet file ({type(e).__name__})"
        ) from None
    _duplicates(path, list(table.column_names))
    return list(table.column_names), table.to_pylist()


def _lift_field_limit() -> None:
    """Let a CSV cell be as long as a JSON Lines value may be (any length): the csv module's
    default 128 KiB limit refused long documents that the same rows as JSON Lines train on."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # a C long narrower than Py_ssize_t (Windows)
            limit //= 2


def _duplicates(path: Path, columns: list[str]) -> None:
    """ValueError naming a column name that occurs twice: readers keep one of the two
    silently (csv's DictReader the last), so a run would train on a column nobody chose."""
    seen = set()
    for c in columns:
        if c in seen:
            where = ", ".join(str(i + 1) for i, x in enumerate(columns) if x == c)
            raise ValueError(
                f"data file {str(path)!r} has two columns named {c!r} (columns {where}); "
                "rename one so that --text-column / --label-column pick one unambiguously"
            )
        seen.add(c)


def _read_delimited(
    path: Path, f: io.TextIOBase, fmt: str
) -> tuple[list[str], list[dict[str, Any]]]:
    _lift_field_limit()
    try:
        reader = csv.DictReader(f, delimiter="\t" if fmt == ".tsv" else ",")
        columns = list(reader.fieldnames or [])
        _duplicates(path, columns)
        rows = list(reader)
    except csv.Error as e:
        raise ValueError(f"{str(path)!r} is not a readable {fmt[1:]} file ({e})") from None
    expected = "\t" if fmt == ".tsv" else ","
    if len(columns) == 1:
        # Excel in many locales saves "CSV" with ';': the whole header becomes one column
        other = next((c for c in ";\t,|" if c != expected and c in columns[0]), None)
        if other is not None:
            raise ValueError(
                f"{path.name} has a single column {columns[0]!r}: its fields look separated by "
                f"{other!r}; save it comma-separated as .csv or tab-separated as .tsv"
            )
    return columns, rows


def _pairs(path: Path, line: int):
    """A ``json.loads`` hook that refuses an object with a key twice (json keeps the last)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) < len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(
                f"data file {str(path)!r} line {line} has the key {dup!r} twice; keep one"
            )
        return dict(pairs)

    return hook


def _read_jsonl(path: Path, f: io.TextIOBase) -> tuple[list[str], list[dict[str, Any]]]:
    rows, columns = [], {}
    for i, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_pairs(path, i))
        except json.JSONDecodeError as e:
            if i == 1 and line.lstrip().startswith("["):
                raise ValueError(
                    f"{str(path)!r} is one JSON array; write JSON Lines (one object per line)"
                ) from None
            raise ValueError(f"{str(path)!r} line {i} is not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{str(path)!r} line {i} is not a JSON object; use JSON Lines")
        columns.update(dict.fromkeys(row))
        rows.append(row)
    return list(columns), rows

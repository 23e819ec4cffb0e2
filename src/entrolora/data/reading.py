"""Reading the files a user hands us: JSON and safetensors, each failure one line naming the file.

Every reader of a run folder, an adapter or a plan goes through here, so that a missing, empty,
truncated or hand-damaged file gives ``ValueError("<what> '<path>' ...; <fix>")`` rather than a
parser's message that names no file. Nothing here unpickles: JSON and safetensors only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def _checked(path: str | os.PathLike, what: str, fix: str) -> Path:
    path = Path(path)
    if not path.is_file():
        why = "is a folder" if path.is_dir() else "does not exist"
        raise ValueError(f"{what} {str(path)!r} {why}; {fix}")
    return path


def read_json(path: str | os.PathLike, what: str, fix: str, kind: type = dict) -> Any:
    """The JSON value in ``path``, which must be a ``kind`` (``dict``, ``list`` or ``object``).

    ``what`` names the file in the message ("run metrics"), ``fix`` says what to do about it.
    """
    path = _checked(path, what, fix)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{what} {str(path)!r} is not valid JSON ({e.msg} at line {e.lineno} column "
            f"{e.colno}); {fix}"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text; {fix}") from None
    except OSError as e:
        raise ValueError(f"{what} {str(path)!r} cannot be read ({e.strerror}); {fix}") from None
    if kind is not object and not isinstance(value, kind):
        want = {dict: "an object", list: "an array"}.get(kind, kind.__name__)
        raise ValueError(
            f"{what} {str(path)!r} holds a JSON {type(value).__name__}, not {want}; {fix}"
        )
    return value


def read_tensors(
    path: str | os.PathLike, what: str, fix: str, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path`` (no pickle), on ``device``."""
    from safetensors.torch import load_file

    path = _checked(path, what, fix)
    try:
        return load_file(str(path), device=device)
    except Exception as e:  # safetensors raises its own error types for bad headers/truncation
        raise ValueError(
            f"{what} {str(path)!r} is corrupted or truncated ({_short(e)}); {fix}"
        ) from None


def read_metadata(path: str | os.PathLike, what: str, fix: str) -> dict[str, str]:
    """The string metadata of a safetensors file's header, without reading the tensors."""
    from safetensors import safe_open

    path = _checked(path, what, fix)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(
            f"{what} {str(path)!r} is corrupted or truncated ({_short(e)}); {fix}"
        ) from None


def _short(e: BaseException) -> str:
    """The first line of an exception's message, at most 120 characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."

"""The public API's argument guard: one line per wrong type, naming the call, the argument and
what to pass instead (a path where a model is expected, a string where a plan is expected)."""

from __future__ import annotations

import os
from typing import Any


def got(value: Any) -> str:
    """``"str 'models/llama'"``; a module or other large object by its type alone (one line)."""
    from torch import nn

    if isinstance(value, nn.Module) or type(value).__repr__ is object.__repr__:
        return f"a {type(value).__name__}"
    shown = " ".join(repr(value).split())
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"{type(value).__name__} {shown}"


def need_model(value: Any, call: str, arg: str = "model") -> None:
    """TypeError unless ``value`` is a torch ``nn.Module``."""
    from torch import nn

    if isinstance(value, nn.Module):
        return
    hint = ""
    if isinstance(value, (str, os.PathLike)):
        hint = (
            "; load the model first, e.g. transformers.AutoModelForCausalLM.from_pretrained"
            f"({os.fspath(value)!r})"
        )
    raise TypeError(f"{call}: {arg} must be a torch nn.Module, got {got(value)}{hint}")


def need_path(value: Any, call: str, arg: str = "directory") -> None:
    """TypeError unless ``value`` is a path (``str`` or ``os.PathLike``), not empty."""
    if isinstance(value, (str, os.PathLike)) and os.fspath(value) != "":
        return
    from torch import nn

    hint = "; were the arguments swapped?" if isinstance(value, nn.Module) else ""
    raise TypeError(f"{call}: {arg} must be a folder path (str or pathlib.Path), got "
                    f"{got(value)}{hint}")  # fmt: skip


def need_str(value: Any, call: str, arg: str) -> None:
    """TypeError unless ``value`` is a string."""
    if not isinstance(value, str):
        raise TypeError(f"{call}: {arg} must be a string, got {got(value)}")

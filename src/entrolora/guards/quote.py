"""The generated-text guard: a value that came from a user (a path, a model or module name, a
method string, a metric) goes into generated text only through the quoting of the language it
lands in, so that copying a model card's snippet never runs code hidden in a folder name and a
report never renders markup hidden in a label.

``py`` for Python source, ``sh`` for shell, ``yaml`` for YAML front matter, ``html`` for HTML,
``md`` for Markdown text and table cells, ``md_code`` for inline code, ``fence`` for a fenced
block's delimiter.
"""

from __future__ import annotations

import html as _html
import json
import re
import shlex
from typing import Any


def py(value: Any) -> str:
    """A Python string literal of ``str(value)`` (``repr``: quotes and backslashes escaped)."""
    return repr(str(value))


def sh(value: Any) -> str:
    """One shell word holding ``str(value)`` exactly (``shlex.quote``)."""
    return shlex.quote(str(value))


def yaml(value: Any) -> str:
    """A YAML double-quoted scalar of ``str(value)`` (JSON's string syntax is valid YAML)."""
    return json.dumps(str(value), ensure_ascii=False)


def html(value: Any) -> str:
    """``str(value)`` with ``& < > " '`` escaped for HTML text and attributes."""
    return _html.escape(str(value), quote=True)


def _one_line(value: Any) -> str:
    return " ".join(str(value).split())


def md(value: Any) -> str:
    """``str(value)`` as Markdown text on one line, safe in a table cell: HTML escaped (Markdown
    renders raw HTML), ``|``, ``\\`` and the characters that start emphasis, links or code
    escaped."""
    text = _html.escape(_one_line(value), quote=False)
    return re.sub(r"([\\`*_\[\]|#!])", r"\\\1", text)


def md_code(value: Any) -> str:
    """``str(value)`` as inline code on one line: fenced by one more backtick than it holds, and
    ``|`` escaped so that a table cell stays one cell."""
    text = _one_line(value).replace("|", "\\|")
    ticks = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def fence(text: str) -> str:
    """A code-fence delimiter longer than any run of backticks in ``text`` (at least three)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)

"""Shared helpers for the bench scripts: step timing, peak memory, tables, resumable CSV rows.

Benchmarks report medians over timed steps after an untimed warm-up, synchronising CUDA around
each step so that the clock sees the kernels, not their launches. Tables are plain Markdown so
that docs/benchmarks.md can include the generated files verbatim.
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from entrolora.files import atomic_write_text


# -- timing and memory ----------------------------------------------------------------------------
@dataclass
class StepTimes:
    """Seconds of each timed step (warm-up excluded) with their median and mean in ms."""

    seconds: list[float]

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.seconds)

    @property
    def mean_ms(self) -> float:
        return 1e3 * statistics.fmean(self.seconds)


def time_steps(
    step: Callable[[int], Any], steps: int, warmup: int, device: torch.device | None = None
) -> StepTimes:
    """Run ``step(i)`` for ``warmup + steps`` iterations and time the last ``steps``.

    ``device`` of type cuda is synchronised before and after every step. ValueError when
    ``steps < 1`` or ``warmup < 0``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 to take a median, got {steps}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    cuda = device is not None and device.type == "cuda"
    out = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step(i)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return StepTimes(out)


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory window (CUDA only; the CPU has no resettable counter)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    """CUDA ``max_memory_allocated`` since the last reset in MiB; None on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


# -- statistics -----------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value); ValueError when empty."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    mean = statistics.fmean(vals)
    return mean, (statistics.stdev(vals) if len(vals) > 1 else 0.0)


# -- tables ---------------------------------------------------------------------------------------
def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of ``rows`` (missing cells empty); numbers must be pre-formatted."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = ["" if r.get(c) is None else str(r.get(c)) for c in columns]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def fmt(value: Any, digits: int = 2) -> str:
    """A number with ``digits`` decimals (``n/a`` for None or NaN), other values as str."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


# -- resumable CSV --------------------------------------------------------------------------------
def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV file written by ``append_row`` ([] when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def append_row(path: str | os.PathLike, row: Mapping[str, Any], fields: Sequence[str]) -> Path:
    """Append ``row`` to the CSV at ``path`` by rewriting it atomically (never half a row).

    ``fields`` is the header; a column of the existing file that is not in ``fields`` is kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Two grid runners (e.g. one per seed) may append at once: lock the folder around the
    # read-modify-rename so that neither loses the other's row.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        _lock(fd)
        rows = read_rows(path)
        header = list(fields) + [k for r in rows[:1] for k in r if k not in fields]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in [*rows, row]:
            w.writerow({k: r.get(k, "") for k in header})
        return atomic_write_text(path, buf.getvalue())
    finally:
        os.close(fd)  # closing releases the lock


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: one runner at a time
        return
    fcntl.flock(fd, fcntl.LOCK_EX)


# -- the machine ----------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict[str, str]:
    """Device name, CPU threads and library versions, for the header of every result."""
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "absent"

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, "
        f"{os.cpu_count()} cores)"
    )
    return {
        "device": name,
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "entrolora": version("entrolora"),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (CPU figures differ between machines of one
    kind), else the platform's processor or machine string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(info: Mapping[str, str]) -> str:
    """One line for a table header: ``device; torch x, transformers y, peft z; date``."""
    return (
        f"{info['device']}, {info['torch_threads']} torch threads; python {info['python']}, "
        f"torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}, "
        f"entrolora {info['entrolora']}; {info['date']}"
    )


# -- docs ---------------------------------------------------------------------------------------
INCLUDE = re.compile(
    r"(<!-- include: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- end include -->)", re.DOTALL
)


def refresh_includes(
    doc: str | os.PathLike, root: str | os.PathLike = ".", under: str | None = None
) -> Path:
    """Replace each ``<!-- include: PATH -->`` … ``<!-- end include -->`` block of ``doc`` with
    the current text of ``root/PATH`` (so generated tables are copied verbatim, never typed);
    with ``under``, only the blocks whose PATH starts with it.

    A file that does not exist yet becomes a line saying so. Written atomically.
    """
    doc = Path(doc)
    text = doc.read_text(encoding="utf-8")

    def body(m: re.Match) -> str:
        if under is not None and not m["path"].startswith(under):
            return m.group(0)
        src = Path(root) / m["path"]
        inner = (
            src.read_text(encoding="utf-8")
            if src.is_file()
            else f"*({m['path']} not generated yet)*\n"
        )
        if src.suffix == ".txt":  # benchmark console output: keep its alignment
            inner = f"```text\n{inner.rstrip()}\n```\n"
        return f"{m.group(1)}{inner.rstrip()}\n{m.group(4)}"

    return atomic_write_text(doc, INCLUDE.sub(body, text))


def decaying_mean(
    m: int, n: int, alpha: float, gen: torch.Generator, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``μ = U diag(i^-α) Vᵀ`` ``(m, n)`` over ``min(m, n) // 4`` random orthonormal directions."""
    r = max(1, min(m, n) // 4)
    u = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=dtype))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=dtype))[0]
    return (u * torch.arange(1, r + 1, dtype=dtype).pow(-alpha)) @ v.mT


if __name__ == "__main__":
    # python bench/common.py docs/benchmarks.md [PATH PREFIX] — copy the generated tables (those
    # under the prefix) into the doc
    doc, *prefix = sys.argv[1:]
    print(refresh_includes(doc, Path(__file__).resolve().parents[1], *prefix))

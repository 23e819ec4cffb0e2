"""One progress bar for every long loop (probe, training, evaluation, large exports,
benchmarks): tqdm, or a silent stand-in when disabled or when tqdm is not installed (it is an
optional dependency)."""

from __future__ import annotations

from typing import Any


class NoBar:
    """The silent stand-in: accepts tqdm's calls and does nothing."""

    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc: Any) -> None: ...


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "step") -> Any:
    """A tqdm bar over ``total`` items (rate and ETA shown) or ``NoBar()``; close it when done."""
    if not enabled:
        return NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return NoBar()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

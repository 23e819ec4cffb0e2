"""FlexLoRA's pure parts (METHODS.md §5): the schedule (eq. 4), eq. 3 on a vector, move selection.

No tensors of the model here: every function maps plain values to plain values, so the
controller's decisions are testable alone and identical on every process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

EPS = 1e-12


@dataclass(frozen=True)
class FlexSchedule:
    """When and how much rank moves (METHODS.md §5 eq. 4, made well-defined).

    Adjustments happen at steps ``t`` with ``t_warmup ≤ t < T − t_final`` and
    ``(t − t_warmup) mod interval = 0``, moving
    ``b(t) = round(b0·(1 − (t − t_warmup)/(T − t_final − t_warmup))³)`` directions, clamped to
    ``[0, b0]`` (``round`` is Python's, half to even).
    """

    total_steps: int
    b0: int = 4
    t_warmup: int = 0
    t_final: int = 0
    interval: int = 1

    def __post_init__(self) -> None:
        for name in ("total_steps", "b0", "t_warmup", "t_final", "interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"FlexLoRA {name} must be an int, got {type(v).__name__} {v!r}")
        if self.total_steps < 1:
            raise ValueError(f"FlexLoRA total_steps must be ≥ 1, got {self.total_steps}")
        if self.b0 < 0 or self.t_warmup < 0 or self.t_final < 0:
            raise ValueError(
                f"FlexLoRA b0, t_warmup and t_final must be ≥ 0; got b0={self.b0}, "
                f"t_warmup={self.t_warmup}, t_final={self.t_final}"
            )
        if self.interval < 1:
            raise ValueError(f"FlexLoRA interval must be ≥ 1, got {self.interval}")
        if self.span <= 0:
            raise ValueError(
                f"FlexLoRA schedule refused: T − t_final − t_warmup = {self.total_steps} − "
                f"{self.t_final} − {self.t_warmup} = {self.span} ≤ 0 leaves no step to adjust "
                "ranks; lower t_warmup / t_final or raise total_steps"
            )

    @classmethod
    def default(
        cls,
        total_steps: int,
        b0: int = 4,
        t_warmup: int | None = None,
        t_final: int | None = None,
        interval: int | None = None,
    ) -> FlexSchedule:
        """Fill unset values: warm-up and final phase 10 % of T each, about 20 adjustments.

        The warm-up was chosen by measurement (``bench/flexlora/flexlora_warmup.py``,
        docs/flexlora.md "The default warm-up"): with the revised init the importance read at 0.1·T
        already
        ranks modules as the trained update does (Spearman ρ 0.85–0.96 at 50 steps), and longer
        warm-ups cost accuracy (moves then prune learned directions).
        """
        if isinstance(total_steps, int) and total_steps >= 1:
            t_warmup = total_steps // 10 if t_warmup is None else t_warmup
            t_final = total_steps // 10 if t_final is None else t_final
            if interval is None and isinstance(t_warmup, int) and isinstance(t_final, int):
                interval = max(1, (total_steps - t_final - t_warmup) // 20)
        # only unset values take defaults: interval=0 is refused, never silently made 1
        return cls(
            total_steps, b0, 0 if t_warmup is None else t_warmup,
            0 if t_final is None else t_final, 1 if interval is None else interval,
        )  # fmt: skip

    @property
    def span(self) -> int:
        """``T − t_final − t_warmup``: the length of the adjustment phase."""
        return self.total_steps - self.t_final - self.t_warmup

    def is_adjustment_step(self, t: int) -> bool:
        """True when step ``t`` is one of the scheduled adjustment steps (even if b(t) = 0)."""
        return (
            self.t_warmup <= t < self.total_steps - self.t_final
            and (t - self.t_warmup) % self.interval == 0
        )

    def budget(self, t: int) -> int:
        """``b(t)``, the directions moved at step ``t``; 0 off the schedule."""
        if not self.is_adjustment_step(t):
            return 0
        b = round(self.b0 * (1.0 - (t - self.t_warmup) / self.span) ** 3)
        return min(max(b, 0), self.b0)

    def steps(self) -> list[int]:
        """All scheduled adjustment steps, ascending."""
        return list(range(self.t_warmup, self.total_steps - self.t_final, self.interval))


def spectral_importance(values: torch.Tensor | Sequence[float]) -> float:
    """Spectral-entropy importance of one matrix from its singular values (METHODS.md §5 eq. 3).

    ``s_i = v_i²/Σv_j²``, ``I = −(1/log r)·Σ s_i·log(s_i + 1e-12)`` in float64 with ``r`` the
    number of values; 0 when r ≤ 1 or all values are 0. The controller applies it to the exact
    spectrum of each update (or to λ with ``importance="lambda"``).
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    r = v.numel()
    energy = v.square()
    total = energy.sum()
    if r <= 1 or total == 0:
        return 0.0
    s = energy / total
    return float(-(s * torch.log(s + EPS)).sum() / math.log(r))


def select_moves(
    importance: Sequence[float],
    ranks: Sequence[int],
    capacities: Sequence[int],
    budget: int,
    r_min: int = 1,
) -> tuple[list[int], list[int]]:
    """Which matrices lose and which gain one direction: ``(prune, expand)`` index lists.

    Matrices are sorted by importance, ties broken by index. Prune candidates: from the least
    important up, those with ``r > r_min``; expand candidates: from the most important down,
    those with ``r < capacity``. The k-th pair is taken while ``k < budget`` and the k-th prune
    candidate ranks strictly below the k-th expand candidate, so both sets are disjoint, equal in
    size and every pruned matrix is less important than every expanded one.
    """
    order = sorted(range(len(importance)), key=lambda i: (importance[i], i))
    pos = {i: p for p, i in enumerate(order)}
    low = [i for i in order if ranks[i] > r_min]
    high = [i for i in reversed(order) if ranks[i] < capacities[i]]
    n = 0
    while n < min(budget, len(low), len(high)) and pos[low[n]] < pos[high[n]]:
        n += 1
    return low[:n], high[:n]

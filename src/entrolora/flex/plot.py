"""FlexLoRA figures: the rank-evolution heatmap (the paper's Figure 2) and training-loss curves."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..files import pyplot, save_png

History = Iterable[tuple[int, Mapping[str, int]]]


def _depth_key(name: str, index: int) -> tuple[int, int]:
    from ..targets import split_module_name

    try:
        return split_module_name(name)[1], index
    except ValueError:
        return -1, index


def rank_matrix(history: History) -> tuple[list[str], list[int], list[list[int]]]:
    """``(modules sorted by depth, steps, ranks[module][step])`` from a FlexLoRA history."""
    history = list(history)
    if not history:
        raise ValueError(
            "the FlexLoRA history is empty: no adjustment step has run yet "
            "(train past t_warmup, or check the schedule)"
        )
    first = list(history[0][1])
    names = sorted(first, key=lambda n: _depth_key(n, first.index(n)))
    steps = [int(s) for s, _ in history]
    ranks = [[int(r.get(n, 0)) for _, r in history] for n in names]
    return names, steps, ranks


def draw_rank_evolution(ax, history: History, title: str = "FlexLoRA rank evolution"):
    """Draw the heatmap of active ranks (modules by depth × adjustment steps) on ``ax``."""
    names, steps, ranks = rank_matrix(history)
    im = ax.imshow(ranks, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("training step (adjustment steps)")
    ax.set_ylabel("adapted module (by depth)")
    ax.set_title(title)
    xt = range(0, len(steps), max(1, len(steps) // 12))
    ax.set_xticks(list(xt), [str(steps[i]) for i in xt], rotation=45)
    yt = range(0, len(names), max(1, len(names) // 40))
    ax.set_yticks(list(yt), [names[i] for i in yt], fontsize=7)
    return im


def plot_rank_evolution(
    history: History, path: str | os.PathLike, title: str = "FlexLoRA rank evolution"
) -> Path:
    """Heatmap of active ranks, modules (by depth) × adjustment steps, as the paper's Figure 2.

    Writes a PNG (matplotlib, Agg) atomically; returns the path.
    """
    names, steps, _ = rank_matrix(history)
    height = min(2 + 0.18 * len(names), 30)
    width = min(4 + 0.25 * len(steps), 24)
    fig, ax = pyplot().subplots(figsize=(width, height))
    im = draw_rank_evolution(ax, history, title)
    fig.colorbar(im, ax=ax, label="active rank")
    return save_png(fig, path, dpi=120)


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (shorter at the start), as the progress bar shows."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curves(
    losses: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    history: History | None = None,
    window: int = 5,
    title: str = "training loss",
) -> Path:
    """Per-step training losses of several runs (raw, faint; trailing mean, solid) and, when a
    FlexLoRA ``history`` is given, its rank evolution beside them. Writes a PNG; returns it."""
    panels = 2 if history is not None else 1
    fig, axes = pyplot().subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    for i, (label, ys) in enumerate(losses.items()):
        colour = f"C{i}"
        ax.plot(range(len(ys)), ys, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(range(len(ys)), smooth(ys, window), color=colour, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (faint: per step; solid: mean of {window})")
    ax.set_title(title)
    ax.legend()
    if history is not None:
        im = draw_rank_evolution(axes[0][1], history)
        fig.colorbar(im, ax=axes[0][1], label="active rank")
    return save_png(fig, path)

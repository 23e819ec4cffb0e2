"""A run's state between its steps: ``Job`` (what was loaded) and ``Adapted`` (the model with its
adapters). Below both the steps (``run``) and the writer (``write``), which read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import datasets as D
from .config import TrainConfig


@dataclass
class Job:
    """A run's inputs once loaded: data splits, model, targets and the step budget."""

    cfg: TrainConfig
    method: str
    device: torch.device
    train_ds: D.TextDataset
    test_ds: D.TextDataset
    model: nn.Module
    tokenizer: Any
    family: str
    targets: list[str]
    steps_per_epoch: int
    total: int
    times: dict[str, float] = field(default_factory=lambda: {"probe_s": 0.0, "plan_s": 0.0})
    memory: tuple[float, str] = (0.0, "")  # peak memory after evaluation (loop.peak_memory)


@dataclass
class Adapted:
    """The model with its adapters (or peft baseline) and what made them."""

    model: nn.Module
    opts: dict[str, Any]
    heads: dict[str, nn.Module]
    head_prefixes: tuple[str, ...]
    plan: Any = None
    stats: Any = None
    flex: Any = None
    params: tuple[int, int] = (0, 0)  # (adapter, head) parameters that train

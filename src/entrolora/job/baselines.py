"""The peft baselines (peft-lora, dora, adalora, vera, lora-plus), built with peft itself."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import PEFT_OPTIONS, TrainConfig


def build_peft(
    model: nn.Module, method: str, targets: list[str], cfg: TrainConfig, total: int
) -> tuple[nn.Module, dict[str, Any]]:
    """``(peft model, options with defaults)`` for a peft baseline over ``targets``."""
    import peft

    task_type = "SEQ_CLS" if cfg.task == "classify" else "CAUSAL_LM"
    opts = {**PEFT_OPTIONS[method], **cfg.options}
    common = {"target_modules": targets, "task_type": task_type}
    if method in ("peft-lora", "dora", "lora-plus"):
        config = peft.LoraConfig(
            r=cfg.r,
            lora_alpha=opts["lora_alpha"],
            lora_dropout=cfg.dropout,
            use_dora=method == "dora",
            **common,
        )
    elif method == "adalora":
        config = _adalora_config(peft, cfg, opts, total, common)
    else:
        config = peft.VeraConfig(
            r=cfg.r, d_initial=opts["d_initial"], vera_dropout=cfg.dropout, **common
        )
    return peft.get_peft_model(model, config), opts


def _adalora_config(peft: Any, cfg: TrainConfig, opts: Mapping[str, Any], total: int, common):
    # AdaLoRA's budget schedule needs tinit + tfinal < total; short runs drop both phases
    tinit = opts["tinit"] if opts["tinit"] is not None else total // 10
    tfinal = opts["tfinal"] if opts["tfinal"] is not None else total // 10
    if total - tinit - tfinal < 1:
        tinit = tfinal = 0
    delta = opts["deltaT"] or max(1, (total - tinit - tfinal) // 10)
    return peft.AdaLoraConfig(
        init_r=opts["init_r"] or max(cfg.r + 1, (3 * cfg.r) // 2),
        target_r=cfg.r,
        lora_alpha=opts["lora_alpha"],
        total_step=total,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=delta,
        lora_dropout=cfg.dropout,
        **common,
    )


def loraplus_optimizer(model: nn.Module, cfg: TrainConfig, opts: Mapping[str, Any]):
    """LoRA+'s AdamW (B's learning rate ``loraplus_lr_ratio`` × A's), from peft."""
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model=model,
        optimizer_cls=torch.optim.AdamW,
        lr=cfg.lr,
        loraplus_lr_ratio=float(opts["loraplus_lr_ratio"]),
        weight_decay=cfg.weight_decay,
    )

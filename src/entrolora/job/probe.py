"""The probe and plan steps of a run: probe the model on calibration batches (METHODS.md §1),
then call the method's planner with the rank under the planner's own name."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .. import distributed as eld
from ..data import datasets as D
from ..probing.head import centroid_head, output_layer  # noqa: F401  (the job's names, kept)
from .config import TrainConfig, planner_name
from .models import check_max_length, like_lora_meta, model_name


def calibration_batches(
    tokenizer: Any, train_ds: D.TextDataset, cfg: TrainConfig, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """This rank's share of up to ``cfg.probe_steps`` shuffled training batches, on ``device``.

    The shuffle seed (``seed - 1``) differs from every training epoch's (``seed + epoch``).
    """
    batches = []
    if cfg.task == "sft":  # the training loss: labels on the answers only
        from .sft import train_batches

        shuffled = train_batches(train_ds, cfg.batch_size, cfg.seed - 1, tokenizer.pad_token_id)
    else:
        shuffled = D.iter_batches(
            tokenizer, train_ds, cfg.batch_size, cfg.max_length, cfg.task, shuffle=True,
            seed=cfg.seed - 1,
        )  # fmt: skip
    for b in shuffled:
        batches.append({k: v.to(device) for k, v in b.items()})
        if len(batches) == cfg.probe_steps:
            break
    # each rank probes its share of the same batches; the probe sums over ranks (METHODS.md §1)
    return list(eld.shard(batches))


def run_probe(
    model: nn.Module,
    tokenizer: Any,
    train_ds: D.TextDataset,
    targets: list[str],
    cfg: TrainConfig,
    device: torch.device,
    report: bool = True,
):
    """Probe ``model`` on up to ``cfg.probe_steps`` shuffled training batches (METHODS.md §1).

    The probe's loss is the task loss (``model(**batch).loss``); the model is in eval mode, so
    no dropout noise enters the statistics. ``report``: print ``snr_report`` to stderr (the
    main process; the SNR line with progress on, the low-SNR warning always).
    """
    import entrolora as el

    check_max_length(model, cfg.max_length, model_name(cfg.model))
    model.eval()
    batches = calibration_batches(tokenizer, train_ds, cfg, device)
    stats = el.probe(
        model,
        batches,
        targets,
        steps=len(batches),
        allow_fewer=True,
        progress=cfg.progress and eld.is_main_process(),
        head=cfg.probe_head if cfg.task == "classify" else "model",
    )
    like_lora = like_lora_meta(model)
    if like_lora:  # the auto planner's default budget reads it (METHODS.md §7)
        stats.meta["like_lora"] = like_lora
    if report and eld.is_main_process():
        summary, *warning = snr_report(stats)
        for line in ([summary] if cfg.progress else []) + warning:
            print(line, file=sys.stderr)
    return stats


def snr_report(stats: Any) -> list[str]:
    """``[median SNR per module type]`` plus, when most modules have SNR < 1, the one-line
    warning with the probe steps that would lift them (METHODS.md §2, probe noise)."""
    from ..report import short_type

    by_type = stats.snr_by_type()
    if not by_type:
        return ["probe SNR: no noise estimate (one batch); plans read the raw statistics"]
    cells = ", ".join(f"{short_type(t)} {v:.2f}" for t, v in by_type.items())
    warning = stats.low_snr_warning()
    return [f"probe SNR (median per module type, {stats.steps} steps): {cells}"] + (
        [warning] if warning else []
    )


def make_plan(
    method: str, stats: Any, model: nn.Module | None, targets: list[str], cfg: TrainConfig
):
    """Call ``entrolora.plan`` with the rank under the planner's own name (``r`` or ``r_ref``;
    auto: the default budget ``like-lora=r``, METHODS.md §7).

    ``stats`` None: the planner plans from ``model`` and ``targets`` (lora, sharelora, flexlora).
    """
    from ..planners import plan as plan_by_name
    from ..planners import planner_options

    name = planner_name(method)
    known = planner_options(name)
    opts = {k: v for k, v in cfg.options.items() if k in known}
    for key in ("r", "r_ref"):
        if key in known and key not in opts:
            opts[key] = cfg.r
            break
    if name == "auto" and "budget" not in opts:  # the same parameters as LoRA at --r
        opts["budget"] = f"like-lora={cfg.r}"
    if stats is None:
        return plan_by_name(name, model, target_modules=targets, **opts)
    plan = plan_by_name(name, stats, **opts)
    probed = (getattr(stats, "meta", None) or {}).get("target_modules")
    if probed and plan.options.get("target_modules") is None:
        # recorded, so that AdaptationPlan.validate knows which layers the plan is meant to
        # cover (a probe of some layers only is not a plan for a smaller model)
        plan = replace(plan, options={**plan.options, "target_modules": probed})
    return plan

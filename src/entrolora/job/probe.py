"""The probe and plan steps of a run: probe the model on calibration batches (METHODS.md §1),
then call the method's planner with the rank under the planner's own name."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .. import distributed as eld
from ..data import datasets as D
from .config import TrainConfig, planner_name
from .model_checks import check_max_length, model_name
from .models import head_modules, like_lora_meta


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
    centroid = cfg.task == "classify" and cfg.probe_head == "centroid"
    with centroid_head(model, batches) if centroid else nullcontext(False) as used:
        stats = el.probe(
            model,
            batches,
            targets,
            steps=len(batches),
            allow_fewer=True,
            progress=cfg.progress and eld.is_main_process(),
        )
    if cfg.task == "classify":
        stats.meta["probe_head"] = "centroid" if used else "model"
    like_lora = like_lora_meta(model)
    if like_lora:  # the auto planner's default budget reads it (METHODS.md §7)
        stats.meta["like_lora"] = like_lora
    if report and eld.is_main_process():
        summary, *warning = snr_report(stats)
        for line in ([summary] if cfg.progress else []) + warning:
            print(line, file=sys.stderr)
    return stats


def output_layer(model: nn.Module) -> nn.Linear | None:
    """The classifier's last linear layer (``classifier``, ``score``, or the last ``nn.Linear``
    inside such a head, e.g. RoBERTa's ``out_proj``); None for a model without one."""
    layers = [m for h in head_modules(model).values() for m in h.modules()]
    layers = [m for m in layers if isinstance(m, nn.Linear)]
    return layers[-1] if layers else None


@contextmanager
def centroid_head(model: nn.Module, batches: Sequence[dict[str, Any]]) -> Iterator[bool]:
    """Inside the block, the output layer of ``model``'s classifier is the centroid head of
    ``batches``: row c is the mean of the layer's input over the examples of class c minus the
    mean over all, the rows scaled to the Frobenius norm of the model's init (``config.
    initializer_range``·√(out·in); else the loaded weight's), the bias 0. On exit
    the loaded weights come back. Yields whether it applied (False: no output layer, no
    integer ``labels``, or fewer than two classes in the batches; the head is then untouched).

    Why: a freshly drawn head sends each seed's gradients along its own random direction, and
    plans moved with the seed more than with the calibration batches (docs/benchmarks.md §3).
    The centroid head depends on the model and the data only, keeps the init's scale (logits
    near 0, so the gradients are not shrunk as by a fitted head), and points where the classes
    differ. The features come from one forward pass without gradients per batch in which the
    layer passes its input through (a forward hook): the model's own pooling (first token, last
    non-pad token) then hands over exactly the layer's input. Several processes: the class sums
    are global.
    """
    layer = output_layer(model)
    rows = None if layer is None else _centroid_rows(model, layer, batches)
    if rows is None:
        yield False
        return
    saved = [p.detach().clone() for p in layer.parameters()]
    # the init's scale, from the config where it says (the same for every seed), else the
    # loaded weight's: logits stay near 0, as at the start of fine-tuning
    std = getattr(getattr(model, "config", None), "initializer_range", None)
    norm = std * layer.weight.numel() ** 0.5 if std else float(saved[0].norm())
    with torch.no_grad():
        layer.weight.copy_(rows * (norm / rows.norm()))
        if layer.bias is not None:
            layer.bias.zero_()
    try:
        yield True
    finally:
        with torch.no_grad():
            for p, old in zip(layer.parameters(), saved):
                p.copy_(old)


def _centroid_rows(
    model: nn.Module, layer: nn.Linear, batches: Sequence[dict[str, Any]]
) -> torch.Tensor | None:
    """Centred class means of ``layer``'s input, ``(out_features, in_features)`` float64 on the
    layer's device, or None when there is nothing to centre (see ``centroid_head``)."""
    from ..probing.gradients import _all_reduce_sum, _dist_rank_world

    classes, width = layer.out_features, layer.in_features
    dev = layer.weight.device
    sums = torch.zeros(classes, width, dtype=torch.float64, device=dev)
    counts = torch.zeros(classes, dtype=torch.float64, device=dev)
    # the layer hands its input on as its output: the model's own pooling then does the rest
    bypass = layer.register_forward_hook(lambda _layer, args, _out: args[0])
    try:
        with torch.no_grad():
            for batch in batches:
                labels = batch.get("labels")
                if labels is None or labels.is_floating_point():
                    return None
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                feats = model(**inputs).logits.to(dev, torch.float64)
                if tuple(feats.shape) != (len(labels), width):
                    return None  # a head whose input is not one vector per example
                labels = labels.to(dev)
                sums.index_add_(0, labels, feats)
                counts += torch.bincount(labels, minlength=classes)[:classes]
    finally:
        bypass.remove()
    if _dist_rank_world()[1] > 1:
        _all_reduce_sum(sums)
        _all_reduce_sum(counts)
    present = counts > 0
    if int(present.sum()) < 2:
        return None
    overall = sums.sum(0) / counts.sum()
    rows = torch.zeros_like(sums)
    rows[present] = sums[present] / counts[present, None] - overall
    return rows if bool(rows.norm() > 0) else None


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

"""What a run folder holds, written into the staging folder before it is published:

metrics.json        accuracy / loss, trainable parameters, times, peak memory
train_loss.json     the training loss of every optimizer step (a list of floats)
stats.safetensors   gradient statistics (when probed or given)
plan.json           the adaptation plan
adapter/            el.save(model) (+ head.safetensors: the trained classifier head)
peft/               el.export_peft(model) — a stock peft LoRA checkpoint (with the head
                    under ``modules_to_save``); peft baselines: peft's ``save_pretrained``
flex_history.json   FlexLoRA rank history (flexlora only)
report.html, *.png  entrolora.report
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..adapters import inject
from ..files import atomic_write_text
from .baselines import save_peft
from .config import PEFT_METHODS
from .export import head_state, save_head
from .loop import mean_tail
from .models import model_label
from .state import Adapted, Job


def write_run(
    out: Path, job: Job, a: Adapted, losses: list[float], scores: dict, t_start: float
) -> tuple[dict[str, Any], list | None]:
    """Write the run folder's files into ``out`` (the staging folder); ``(metrics, history)``."""
    history = [[s, r] for s, r in a.flex.history] if a.flex is not None else None
    max_rank = None
    if job.method in PEFT_METHODS:
        save_peft(a.model, out / "peft")
    else:
        max_rank = _write_adapter(out, job, a, history, scores)
    atomic_write_text(out / "train_loss.json", json.dumps(losses) + "\n")
    job.times["total_s"] = time.perf_counter() - t_start
    metrics = run_metrics(job, a, losses, scores, max_rank)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")
    if job.cfg.report:
        from ..report import ReportInputs, write_report

        name = Path(job.cfg.output).name
        label = name if name == job.method else f"{name} ({job.method})"
        inputs = ReportInputs(stats=a.stats, plan=a.plan, metrics=metrics, history=history,
                              runs=[metrics], label=label)  # fmt: skip
        write_report(out, inputs, title=f"entrolora run: {label}")
    return metrics, history


def _write_adapter(
    out: Path, job: Job, a: Adapted, history: list | None, scores: dict
) -> int | None:
    """Statistics, plan, adapter (+ head), peft export and FlexLoRA history; the max rank."""
    import entrolora as el

    if a.stats is not None:
        a.stats.save(out / "stats.safetensors", keep_gradients=job.cfg.keep_gradients)
    a.plan.save(out / "plan.json")
    el.save(a.model, out / "adapter", **({"flex": a.flex} if a.flex is not None else {}))
    head = head_state(a.heads)
    if head:
        save_head(out / "adapter", head)
    # the trained head travels in the export's modules_to_save; the scores go to its model card
    card = {k: v for k, v in scores.items() if not isinstance(v, dict)}  # by_category: no row
    info = el.export_peft(a.model, out / "peft", modules_to_save=list(a.heads), metrics=card)
    if history is not None:
        atomic_write_text(out / "flex_history.json", json.dumps(history) + "\n")
    return getattr(info, "max_lora_rank", None)


def run_metrics(
    job: Job, a: Adapted, losses: list[float], scores: dict, max_rank: int | None
) -> dict[str, Any]:
    """The contents of ``metrics.json``."""
    cfg, plan = job.cfg, a.plan
    adapter_params, head_params = a.params
    mem, mem_kind = job.memory
    train_s = job.times["train_s"]
    return {
        "method": job.method,
        "task": cfg.task,
        "model": model_label(cfg.model),
        "model_family": job.family,
        "data": job.train_ds.source,
        "num_labels": job.train_ds.num_labels,
        "train_examples": len(job.train_ds),
        "test_examples": len(job.test_ds),
        **scores,
        "final_train_loss": mean_tail(losses),
        # entrolora methods: as the plan counts them (FlexLoRA: active directions, its
        # budget; LoRI: mask-kept entries); allocated_params: every adapter tensor element
        "trainable_params": (
            inject.num_trainable_params(a.model) if plan is not None else adapter_params
        ),
        "allocated_params": adapter_params,
        "head_params": head_params,
        "plan_params": plan.num_trainable_params() if plan is not None else None,
        "max_lora_rank": max_rank,
        "steps": len(losses),
        "steps_per_s": len(losses) / train_s if train_s > 0 else None,
        **{k: round(v, 3) for k, v in job.times.items()},
        "stats_reused": bool(cfg.stats),
        "peak_memory_mib": round(mem, 1),
        "peak_memory_kind": mem_kind,
        "device": str(job.device),
        "torch_version": torch.__version__,
        "target_modules": sorted(plan.modules) if plan is not None else job.targets,
        "config": asdict(cfg),
    }


def run_bytes(a: Adapted, keep_gradients: bool = False) -> int:
    """About the bytes the run folder will take (known once the adapters exist, before training):
    the adapter and head, the peft export at its padded rank, the head again in the export, the
    kept gradients, and 4 MiB for JSON and figures."""
    from ..export.io import adapter_state

    head = 4 * a.params[1]
    if a.plan is None:  # a peft baseline: peft's own checkpoint of the trainable tensors
        return 4 * a.params[0] + 2 * head + 4 * 2**20
    adapter = sum(t.numel() * t.element_size() for t in adapter_state(a.model).values())
    rank = a.plan.max_rank
    export = sum(4 * (m.d_in + m.d_out) * max(rank, m.capacity or 0)
                 for m in a.plan.modules.values())  # fmt: skip
    grads = 0
    if keep_gradients and a.stats is not None and a.stats.gradients:
        grads = 2 * sum(4 * g.numel() for g in a.stats.gradients.values())  # gradients + noise
    return adapter + 2 * head + export + grads + 4 * 2**20

"""The truncation control of the capacity frontier: a trained LoRA (r = 16) cut to a parameter
budget by one global singular-value threshold, evaluated without retraining.

Each module's update ``ΔW = scale·B·A`` (``d_out × d_in``) is split by a float64 SVD into rank-one
units ``σ u vᵀ``; a unit costs ``d_in + d_out`` parameters (one column of B, one row of A). One
threshold τ over all modules keeps the units with ``σ ≥ τ``, τ the smallest value whose kept
units fit the budget. A planner that cannot beat this control, which costs one SVD per module
after an ordinary LoRA run, adds nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Truncation:
    """What ``truncate`` kept: per-module rank and truncated ``ΔW`` (float64), the threshold
    (``inf`` when nothing fits), the kept units' parameters and every unit's count."""

    ranks: dict[str, int]
    deltas: dict[str, torch.Tensor]
    threshold: float
    params: int
    units: int


def truncate(deltas: Mapping[str, torch.Tensor], budget: int) -> Truncation:
    """Cut ``{module: ΔW (d_out × d_in)}`` to at most ``budget`` parameters by one global
    singular-value threshold; ValueError for a negative budget or a non-matrix ``ΔW``.

    Units are taken in decreasing σ while their cost fits; the first unit that does not fit
    sets τ above itself, so every unit with the same σ is dropped with it (one threshold).
    Singular values at or below numpy's rank tolerance (``σ_max · max(d_out, d_in) · eps``) are
    not units: ``ΔW`` of a rank-r LoRA has r of them, the rest is rounding.
    """
    if budget < 0:
        raise ValueError(f"budget must be ≥ 0 parameters, got {budget}")
    svds, units = {}, []
    for name, dw in deltas.items():
        if dw.dim() != 2:
            raise ValueError(f"ΔW of {name!r} must be a matrix, got shape {tuple(dw.shape)}")
        u, s, vh = torch.linalg.svd(dw.detach().to(torch.float64), full_matrices=False)
        svds[name] = (u, s, vh)
        cost = dw.shape[0] + dw.shape[1]
        tol = float(s.max()) * max(dw.shape) * torch.finfo(torch.float64).eps if s.numel() else 0
        units += [(float(v), name, cost) for v in s.tolist() if v > tol]
    units.sort(key=lambda t: -t[0])
    used, kept, threshold = 0, 0, float("inf")
    for i, (sigma, _, cost) in enumerate(units):
        if used + cost > budget:
            # units of the same σ already kept go too: τ sits strictly above this σ
            while kept and units[kept - 1][0] == sigma:
                kept -= 1
                used -= units[kept][2]
            break
        used, kept = used + cost, i + 1
    if kept:
        threshold = units[kept - 1][0]
    ranks = {name: 0 for name in deltas}
    for _, name, _ in units[:kept]:
        ranks[name] += 1
    out = {}
    for name, (u, s, vh) in svds.items():
        k = ranks[name]
        out[name] = (u[:, :k] * s[:k]) @ vh[:k]
    return Truncation(ranks, out, threshold, used, len(units))


def budget_params(source_params: int, source_r: int, r: int) -> int:
    """The parameters of uniform LoRA at rank ``r`` on the targets where rank ``source_r`` has
    ``source_params``: every unit of uniform LoRA costs ``d_in + d_out``, so counts scale with r."""
    if source_params % source_r:
        raise ValueError(f"{source_params} parameters are not a multiple of rank {source_r}")
    return source_params // source_r * r


def evaluate_truncated(source: Path, r: int, output: Path) -> dict[str, Any]:
    """Load the LoRA run in ``source`` onto its base, cut it to uniform LoRA r=``r``'s parameter
    count (``truncate``), fold the cut ``ΔW`` into the base weights and score the held-out split
    the source run was scored on. Writes ``output/metrics.json``; returns the metrics."""
    import entrolora as el
    from entrolora.adapters import inject
    from entrolora.data.reading import read_tensors
    from entrolora.job.config import TrainConfig
    from entrolora.job.run import evaluate_run, prepare
    from entrolora.job.state import Adapted

    recorded = json.loads((source / "metrics.json").read_text(encoding="utf-8"))
    conf = {**recorded["config"], "output": str(output), "progress": False}
    if isinstance(conf.get("sft"), dict):  # --task sft (issue 30): its options' dataclass
        from entrolora.data.sft import SFTOptions

        conf["sft"] = SFTOptions(**conf["sft"])
    cfg = TrainConfig(**conf)
    job = prepare(cfg, "lora", torch.device("cpu"))
    head_file = source / "adapter" / "head.safetensors"
    if head_file.is_file():
        job.model.load_state_dict(read_tensors(head_file, "classifier head", "rerun"), False)
    t0 = time.perf_counter()
    model = el.load(job.model, source / "adapter")
    wrappers = inject.adapted_modules(model)
    deltas = {name: w.adapter.delta_weight().detach() for name, w in wrappers.items()}
    budget = budget_params(int(recorded["trainable_params"]), int(recorded["config"]["r"]), r)
    cut = truncate(deltas, budget)
    inject.remove_adapters(model)
    with torch.no_grad():
        for name, dw in cut.deltas.items():
            weight = model.get_submodule(name).weight
            weight += dw.to(weight.dtype)
    cut_s = time.perf_counter() - t0
    scores = evaluate_run(job, Adapted(model, {}, {}, ()))
    ranks = sorted(cut.ranks.values())
    metrics = {
        **{k: recorded.get(k) for k in ("head_params", "test_examples", "device")},
        **scores,
        "method": "truncate",
        "trainable_params": cut.params,
        "plan_params": cut.params,
        "budget_params": budget,
        "threshold": cut.threshold,
        "ranks": cut.ranks,
        "rank_range": [ranks[0], ranks[-1]],
        "source_params": recorded["trainable_params"],
        # the control's cost is the source run's training plus the SVDs (no probe, no retraining)
        "probe_s": 0.0,
        "train_s": recorded.get("train_s"),
        "plan_s": cut_s,
        "total_s": cut_s + job.times.get("eval_s", 0.0),
        "final_train_loss": recorded.get("final_train_loss"),
        "steps": 0,
        "config": {**recorded["config"], "method": "truncate", "r": r},
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return metrics

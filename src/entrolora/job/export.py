"""The classifier head in a run's outputs, and ``export_run``: a trained run folder back onto
its base model and out as a stock peft checkpoint (``entrolora export``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import datasets as D
from ..data.reading import read_json, read_tensors
from ..files import atomic_write
from ..guards.staging import OutputFolder, check_output
from .models import load_model

HEAD_FILE = "head.safetensors"


def head_state(heads: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``{"<head>.<param>": tensor}`` of the trained classification head(s), on the CPU."""
    return {
        f"{hn}.{k}": v.detach().cpu().contiguous()
        for hn, h in heads.items()
        for k, v in h.state_dict().items()
    }


def save_head(adapter_dir: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Write the head next to the adapter (``adapter/head.safetensors``)."""
    from safetensors.torch import save_file

    atomic_write(adapter_dir / HEAD_FILE, lambda tmp: save_file(dict(state), tmp))


def _run_adapter(run: Path) -> Path:
    """The adapter folder of a run folder (or the adapter folder itself); errors name the fix."""
    if not run.exists():
        raise FileNotFoundError(f"run folder {str(run)!r} does not exist")
    adapter = run / "adapter" if (run / "adapter").is_dir() else run
    if not (adapter / "plan.json").is_file():
        if (run / "peft" / "adapter_config.json").is_file():
            raise ValueError(
                f"{str(run)!r} is a peft-baseline run: its peft/ folder already is a checkpoint"
            )
        raise ValueError(
            f"{str(run)!r} holds no adapter (no plan.json); pass a folder written by "
            "`entrolora train` or el.save"
        )
    return adapter


def _recorded_metrics(run: Path, adapter: Path) -> dict[str, Any]:
    """The run's ``metrics.json`` (``{}`` when absent), its fields that ``export`` reads checked:
    ``config.model`` and ``config.task`` strings, ``num_labels`` an integer ≥ 2."""
    from ..guards.values import bad, integer

    fix = "pass --model and --task explicitly"
    for folder in (run, adapter.parent):
        path = folder / "metrics.json"
        if path.is_file():
            recorded = read_json(path, "run metrics", fix)
            where = f"run metrics {str(path)!r}"
            cfg = recorded.get("config", {})
            if not isinstance(cfg, dict):
                raise bad(where, "config", cfg, "an object", fix)
            for key in ("model", "task"):
                if cfg.get(key) is not None and not isinstance(cfg[key], str):
                    raise bad(where, f"config.{key}", cfg[key], "a string or null", fix)
            n = recorded.get("num_labels")
            if n is not None and n != 0 and not integer(n, 2):
                raise bad(where, "num_labels", n, "an integer ≥ 2 (or 0 for causal-lm)", fix)
            return recorded
    return {}


def _load_base_with_head(model: str | None, task: str, adapter: Path, recorded: Mapping):
    """The base model with the run's trained head loaded (if any); ``(model, head tensors)``."""
    head: dict[str, torch.Tensor] = {}
    if (adapter / HEAD_FILE).is_file():
        head = read_tensors(adapter / HEAD_FILE, "classifier head", "train the run again")
    num_labels = recorded.get("num_labels") or 2
    for k, v in head.items():
        if k.endswith(".weight") and v.dim() == 2:
            num_labels = int(v.shape[0])
    net, tokenizer, _ = load_model(model, task, num_labels)
    if head:
        missing = [k for k in head if k not in dict(net.named_parameters())]
        if missing:
            raise ValueError(
                f"the run's classifier head {missing[0]!r} does not exist in the base model; "
                "pass the --model the run was trained on"
            )
        net.load_state_dict(head, strict=False)
    return net, head, tokenizer


CARD_METRICS = ("accuracy", "exact_match", "eval_loss", "perplexity", "final_train_loss",
                "trainable_params")  # fmt: skip


def _check_export_kind(layout: str, merged: bool, hf_base: bool) -> None:
    """Refuse contradictory export options before anything loads."""
    from ..export import LAYOUTS

    if layout not in LAYOUTS:
        raise ValueError(f"unknown export layout {layout!r}; choose 'uniform' or 'compact'")
    if merged and hf_base:
        raise ValueError("--merged and --hf-base write different folders; pass one of them")
    if layout != "uniform" and (merged or hf_base):
        raise ValueError("--layout applies to the peft export only; not to --merged / --hf-base")


def export_run(
    run: str | os.PathLike,
    output: str | os.PathLike,
    model: str | None = None,
    task: str | None = None,
    overwrite: bool = False,
    layout: str = "uniform",
    merged: bool = False,
    hf_base: bool = False,
) -> Any:
    """Load a run's adapter (and head) onto its base model and write a stock peft checkpoint.

    ``run`` is a run folder or an adapter folder (holding ``plan.json``); the base model and task
    default to the ones recorded in the run's ``metrics.json``. ``layout``: ``export_peft``'s
    (METHODS.md §6). ``merged``: a full HF model folder with the adapter folded in instead;
    ``hf_base``: the HF-format base without the adapter (what vLLM and llama.cpp load an adapter
    onto). Returns ``export_peft``'s info, or the folder for ``merged`` / ``hf_base``.
    """
    import entrolora as el

    _check_export_kind(layout, merged, hf_base)
    run = Path(run)
    adapter = _run_adapter(run)
    recorded = _recorded_metrics(run, adapter)
    rcfg = recorded.get("config", {})
    if model is None:
        model = rcfg.get("model")
        known = (None, "default", D.DEFAULT_MODEL, D.SMOLLM2)
        if model not in known and not Path(model).is_dir():
            raise FileNotFoundError(
                f"the run was trained on model folder {model!r} (its metrics.json says so), "
                "which does not exist from here; pass --model with that model's folder"
            )
    trained_for = rcfg.get("task")
    task = task or trained_for or "classify"
    if task not in D.TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(D.TASKS)}")
    if trained_for in D.TASKS and task != trained_for:
        raise ValueError(
            f"the run was trained for --task {trained_for} (its metrics.json says so), not "
            f"{task}: its adapters and head belong to that model class; leave --task out"
        )
    # a merged model and a peft checkpoint are different kinds: one never replaces the other
    kind = "merged" if merged or hf_base else "export"
    check_output(output, overwrite, kind)  # before the model loads
    net, head, tokenizer = _load_base_with_head(model, task, adapter, recorded)
    net = el.load(net, adapter)
    with OutputFolder(output, kind, overwrite) as stage:
        try:
            if merged or hf_base:
                info = el.export_merged(net, stage.path, tokenizer, merge_adapters=merged)
            else:
                heads = sorted({k.split(".")[0] for k in head})
                scores = {k: recorded[k] for k in CARD_METRICS if recorded.get(k) is not None}
                info = el.export_peft(
                    net, stage.path, layout, modules_to_save=heads, metrics=scores or None
                )
        except OSError as e:
            raise stage.failed(e) from None
        stage.publish()
    return info

"""Export to an ordinary peft LoRA checkpoint (METHODS.md §6) and to a merged model folder.

Consumers read a LoRA checkpoint's scaling three ways: peft per module from ``alpha_pattern`` /
``rank_pattern``, vLLM as one global ``lora_alpha / r``, llama.cpp as the global ``lora_alpha``
over *each module's tensor rank*. The default ``uniform`` layout writes every module at one rank R
(smaller modules zero-padded, exact) with its scaling baked into B and ``r = lora_alpha = R``: the
scaling is 1 under all three rules. ``compact`` keeps each module's own rank (``rank_pattern =
alpha_pattern``): right in peft and vLLM, wrong in llama.cpp.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.inject import adapted_modules, get_plan, unwrap
from ..files import atomic_write, atomic_write_text
from ..guards.api import need_model, need_path
from ..guards.output import guard_folder, tensor_bytes
from ..plans import AdaptationPlan
from ..progress import progress_bar
from ..targets import is_conv1d
from .card import consumers_and_notes, model_card
from .record import (
    HEAD_NAMES,
    LAYOUTS,
    MINILM_ID,
    SMOLLM2_ID,
    PeftExport,
    is_large,
    vllm_max_lora_rank,
)


def infer_task_type(model: nn.Module) -> str | None:
    """peft's ``task_type`` for a transformers model class (None for a plain torch module).

    Read from transformers' own auto-class tables, so any architecture they know is covered.
    """
    from transformers import PreTrainedModel
    from transformers.models.auto import modeling_auto as ma

    base = unwrap(model)
    if not isinstance(base, PreTrainedModel):
        return None
    cls = type(base).__name__
    tables = {
        "CAUSAL_LM": ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "SEQ_CLS": ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "TOKEN_CLS": ma.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
        "QUESTION_ANS": ma.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
        "SEQ_2_SEQ_LM": ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        "FEATURE_EXTRACTION": ma.MODEL_MAPPING_NAMES,
    }
    for task, table in tables.items():
        if any(cls == v or (isinstance(v, tuple) and cls in v) for v in table.values()):
            return task
    raise ValueError(
        f"cannot tell the peft task_type of a {cls}; pass task_type= (CAUSAL_LM, SEQ_CLS, "
        "TOKEN_CLS, QUESTION_ANS, SEQ_2_SEQ_LM or FEATURE_EXTRACTION)"
    )


def _embedded_ids() -> dict[Path, str]:
    """``{local folder of an embedded default model: its public hub id}`` (those installed)."""
    from ..data import datasets as D

    out: dict[Path, str] = {}
    for find, public in ((D.minilm_path, MINILM_ID), (lambda: D.smollm2_gguf().parent, SMOLLM2_ID)):
        try:
            out[Path(find()).resolve()] = public
        except (FileNotFoundError, ImportError):  # not installed: nothing to map
            continue
    return out


def portable_base_name(name: str | None) -> str | None:
    """``base_model_name_or_path`` another machine can resolve.

    The embedded defaults (the MiniLM folder, the SmolLM2 GGUF package) become their public hub
    ids; any other existing local folder becomes an absolute path; a hub id stays as it is.
    """
    if not name:
        return None
    path = Path(name).expanduser()
    if not path.exists():
        return name  # a hub id (or a path of another machine): nothing better to say
    resolved = path.resolve()
    return _embedded_ids().get(resolved, str(resolved))


def _module_factors(wrapper: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """``(A (r, d_in), B·scale (d_out, r), dtype)``: float32 CPU copies of ``lora_factors()``."""
    a, b, scale = wrapper.adapter.lora_factors()
    return a.detach().float().cpu(), b.detach().float().cpu() * float(scale), a.dtype


def _pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A and zero columns of B up to ``rank``: ``B·A`` is unchanged exactly."""
    extra = rank - a.shape[0]
    if extra <= 0:
        return a, b
    return (
        torch.cat([a, a.new_zeros(extra, a.shape[1])], 0),
        torch.cat([b, b.new_zeros(b.shape[0], extra)], 1),
    )


def _head_tensors(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Full weights of ``modules_to_save`` heads, in peft's key layout."""
    base = unwrap(model)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        module = base.get_submodule(name)
        for k, v in module.state_dict().items():
            out[f"base_model.model.{name}.{k}"] = v.detach().cpu().contiguous().clone()
    return out


def export_peft(
    model: nn.Module,
    directory: str | os.PathLike,
    layout: str = "uniform",
    *,
    task_type: str | None = None,
    base_model: str | None = None,
    modules_to_save: Sequence[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> PeftExport:
    """Write a stock peft LoRA checkpoint of ``model``'s adapters (METHODS.md §6).

    Per module, A and B come from the adapter's ``lora_factors()`` (shared factors copied,
    block-diagonal as ``diag(A_i)``/``diag(B_i)``, VeRA/LoRI/FlexLoRA folded into plain A, B)
    with the scale baked into B. ``layout="uniform"`` (default) zero-pads every module to the
    largest rank R and writes ``r = lora_alpha = R``, no patterns: scaling 1 in peft, vLLM and
    llama.cpp. ``layout="compact"`` keeps each module's rank with ``rank_pattern = alpha_pattern``:
    right in peft and vLLM, wrong in llama.cpp. DoRA exports as peft DoRA (magnitudes as
    trained). ``task_type`` defaults to the model class's, ``base_model`` to a portable form of
    ``config._name_or_path``, ``modules_to_save`` (SEQ_CLS) to the model's classifier/score head.
    Writes ``adapter_model.safetensors``, ``README.md`` and ``adapter_config.json`` (last).
    ``progress``: a bar over the modules; default: for models of ``LARGE_MODEL_PARAMS`` or more.
    """
    need_model(model, "el.export_peft")
    need_path(directory, "el.export_peft")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown export layout {layout!r}; choose 'uniform' or 'compact'")
    wrappers, use_dora = _exportable(model)
    base = unwrap(model)
    task_type = task_type or infer_task_type(base)
    if modules_to_save is None:
        heads = [n for n in HEAD_NAMES if isinstance(getattr(base, n, None), nn.Module)]
        modules_to_save = heads if task_type == "SEQ_CLS" else []
    name_or_path = getattr(getattr(base, "config", None), "_name_or_path", None)
    base_model = portable_base_name(base_model or name_or_path)

    show = is_large(base) if progress is None else progress
    with progress_bar(len(wrappers), "export", show, unit="module") as bar:
        tensors, ranks = _adapter_tensors(wrappers, layout, use_dora, bar)
    tensors.update(_head_tensors(base, modules_to_save))
    rank = max(1, *ranks.values())
    pattern = {} if layout == "uniform" else {n: max(1, r) for n, r in ranks.items()}
    config = _lora_config(
        rank, wrappers, pattern, use_dora, list(modules_to_save), task_type, base_model
    )
    gguf = base_model == SMOLLM2_ID and bool(name_or_path) and Path(name_or_path).exists()
    consumers, notes = consumers_and_notes(layout, use_dora, task_type, gguf)
    info = PeftExport(
        path=Path(directory),
        layout=layout,
        rank=rank,
        max_lora_rank=vllm_max_lora_rank(rank),
        task_type=task_type,
        base_model=base_model,
        consumers=consumers,
        module_ranks=ranks,
        rank_pattern=pattern,
        notes=notes,
        num_labels=getattr(base.config, "num_labels", None) if task_type == "SEQ_CLS" else None,
    )
    card = model_card(info, _plan_or_none(model), metrics)
    # a peft export replaces only a peft export; never a run's folder or anything inside one
    directory = guard_folder(directory, "el.export_peft", "export", tensor_bytes(tensors))
    _write_export(directory, tensors, config, card)
    return info


def _write_export(
    directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], card: str
) -> None:
    """Weights, model card, then ``adapter_config.json``: a folder with it is a complete export."""
    from safetensors.torch import save_file

    atomic_write(
        directory / "adapter_model.safetensors",
        lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
    )
    atomic_write_text(directory / "README.md", card)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write_text(directory / "adapter_config.json", text)


def _exportable(model: nn.Module) -> tuple[dict[str, Any], bool]:
    """The model's adapter wrappers and whether they are DoRA; refuses what peft cannot hold."""
    wrappers = adapted_modules(model)
    if not wrappers:
        raise ValueError("the model has no entrolora adapters to export; el.apply a plan first")
    if any(w.merged for w in wrappers.values()):
        raise ValueError("the adapters are merged into the base weights; el.unmerge(model) first")
    dora = {getattr(w.adapter, "kind", None) == "dora" for w in wrappers.values()}
    if len(dora) > 1:
        raise ValueError("peft cannot hold DoRA and plain LoRA modules in one adapter config")
    return wrappers, dora.pop()


def _adapter_tensors(
    wrappers: Mapping[str, Any], layout: str, use_dora: bool, bar: Any = None
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """peft's ``lora_A``/``lora_B`` (and DoRA magnitude) tensors, and each module's own rank;
    ``bar`` advances once a module."""
    factors = {}
    with torch.no_grad():
        for n, w in wrappers.items():
            factors[n] = _module_factors(w)
            if bar is not None:
                bar.update(1)
    ranks = {n: int(f[0].shape[0]) for n, f in factors.items()}
    # peft and llama.cpp need r ≥ 1: a FlexLoRA module with no active direction exports as one
    # zero direction (exact: it contributes nothing).
    rank = max(1, *ranks.values())
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b, dtype) in factors.items():
        a, b = _pad(a, b, rank if layout == "uniform" else max(1, a.shape[0]))
        prefix = f"base_model.model.{name}"
        # clone: shared factors are one tensor, and safetensors refuses aliased entries
        tensors[f"{prefix}.lora_A.weight"] = a.to(dtype).contiguous().clone()
        tensors[f"{prefix}.lora_B.weight"] = b.to(dtype).contiguous().clone()
        if use_dora:
            mag = wrappers[name].adapter.magnitude.detach().cpu().contiguous().clone()
            tensors[f"{prefix}.lora_magnitude_vector"] = mag
    return tensors, ranks


def _lora_config(
    rank: int,
    wrappers: Mapping[str, Any],
    pattern: dict[str, int],
    use_dora: bool,
    modules_to_save: list[str],
    task_type: str,
    base_model: str | None,
) -> dict[str, Any]:
    """``adapter_config.json`` as peft's ``LoraConfig`` writes it, lists sorted."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(wrappers),
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        use_dora=use_dora,
        fan_in_fan_out=all(is_conv1d(w.base_layer) for w in wrappers.values()),
        modules_to_save=modules_to_save or None,
        task_type=task_type,
        base_model_name_or_path=base_model,
    ).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    config["target_modules"] = sorted(config["target_modules"])
    return config


def _plan_or_none(model: nn.Module) -> AdaptationPlan | None:
    try:
        return get_plan(model)
    except ValueError:
        return None


def to_peft_config(plan: AdaptationPlan, **overrides: Any):
    """A peft ``LoraConfig`` equivalent to ``plan``, when it is a plain per-module LoRA.

    Every module must be kind ``lora`` (or all ``dora``), unshared and with one block; the config
    has ``target_modules`` = the exact module names, ``rank_pattern`` = each module's rank and
    ``lora_alpha`` = the plan's, so peft's per-module scaling ``α/r`` equals entrolora's.
    ``overrides`` go to ``LoraConfig`` (e.g. ``fan_in_fan_out=True`` for GPT-2's Conv1D).
    """
    from peft import LoraConfig

    kinds = {m.kind for m in plan.modules.values()}
    if not kinds <= {"lora"} and kinds != {"dora"}:
        raise ValueError(
            f"plan {plan.method!r} uses adapter kinds {sorted(kinds)}; a peft LoraConfig holds "
            "only plain LoRA (or all-DoRA) modules. Train it with el.apply instead"
        )
    for name, m in plan.modules.items():
        if m.shared or m.group is not None:
            raise ValueError(
                f"plan {plan.method!r} shares factors (module {name!r}, group {m.group!r}); peft "
                "has no shared adapters. Train it with el.apply, or export after training"
            )
        if m.blocks > 1:
            raise ValueError(
                f"plan {plan.method!r} has block-diagonal module {name!r} (blocks={m.blocks}); "
                "peft has no block-diagonal LoRA. Train it with el.apply, or export after training"
            )
    ranks = {name: m.rank for name, m in plan.modules.items()}
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r = max(counts, key=lambda k: (counts[k], -k))
    kwargs: dict[str, Any] = dict(
        r=r,
        lora_alpha=plan.lora_alpha,
        target_modules=sorted(ranks),
        rank_pattern=ranks,
        lora_dropout=0.0,
        bias="none",
        use_dora=kinds == {"dora"},
    )
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


__all__ = [
    "LAYOUTS",
    "PeftExport",
    "export_peft",
    "infer_task_type",
    "portable_base_name",
    "to_peft_config",
    "vllm_max_lora_rank",
]

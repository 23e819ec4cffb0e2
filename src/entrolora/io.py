"""Adapter checkpoints: ``save`` / ``load`` (safetensors + plan.json) and ``export_peft``.

``adapter.safetensors`` holds every adapter parameter and persistent buffer (masks, frozen random
VeRA/LoRI matrices), each shared tensor once under ``"<group id>.<factor>"``, per-module tensors
under ``"<module name>.<factor>"``. ``export_peft`` writes an ordinary peft LoRA checkpoint
(METHODS.md §6). No pickle anywhere: safetensors and JSON only; every file is written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import atomic_write, atomic_write_text
from .inject import adapted_modules, apply, get_plan, remove_adapters, unwrap
from .plans import AdaptationPlan
from .targets import is_conv1d

ADAPTER_FILE = "adapter.safetensors"
PLAN_FILE = "plan.json"
FLEX_FILE = "flex_state.json"
FORMAT = "entrolora.adapter"
FORMAT_VERSION = "1"


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live adapter tensors by stable key: shared ones once as ``<group>.<factor>``."""
    out: dict[str, torch.Tensor] = {}
    for name, wrapper in adapted_modules(model).items():
        adapter = wrapper.adapter
        shared = getattr(adapter, "shared", {})
        for factor, t in adapter.state_dict(keep_vars=True).items():
            gid = shared.get(factor)
            out.setdefault(f"{gid}.{factor}" if gid is not None else f"{name}.{factor}", t)
    return out


def save(model: nn.Module, directory: str | os.PathLike, *, flex: Any = None) -> Path:
    """Write ``adapter.safetensors`` + ``plan.json`` (+ ``flex_state.json``) into ``directory``.

    ``flex`` is a FlexLoRA controller (anything with ``state_dict() -> JSON-able dict``). Each
    file is written to a temporary file in the directory, then renamed. Returns the directory.
    """
    from safetensors.torch import save_file

    plan = get_plan(model)
    directory = Path(directory)
    tensors = {
        k: t.detach().to("cpu").contiguous().clone() for k, t in adapter_state(model).items()
    }
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION}
    atomic_write(directory / ADAPTER_FILE, lambda tmp: save_file(tensors, tmp, metadata=meta))
    if flex is not None:
        atomic_write_text(directory / FLEX_FILE, json.dumps(flex.state_dict(), indent=1) + "\n")
    plan.save(directory / PLAN_FILE)
    return directory


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist; the directory was not written by el.save")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error type for bad headers/truncation
        raise ValueError(
            f"{str(path)!r} is corrupted or truncated ({type(e).__name__}: {e}); "
            "save the adapter again with el.save"
        ) from None


def load(
    base_model: nn.Module,
    directory: str | os.PathLike,
    *,
    dropout: float = 0.0,
    adapter_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Apply ``directory``'s plan to ``base_model`` and load the adapter tensors; returns it.

    The plan is validated against the model first (a plan for another model fails with
    ``AdaptationPlan.validate``'s message), then every tensor's name and shape is checked;
    missing/extra tensors, a shape mismatch, a corrupted or truncated file, or a missing
    ``plan.json`` raise ``ValueError`` and leave the model as it was. Tensors go to each
    parameter's own device (CPU or CUDA).
    """
    directory = Path(directory)
    if not (directory / PLAN_FILE).is_file():
        raise ValueError(
            f"{str(directory / PLAN_FILE)!r} does not exist; pass a directory written by el.save"
        )
    plan = AdaptationPlan.load(directory / PLAN_FILE)
    tensors = _read_tensors(directory / ADAPTER_FILE)
    plan.validate(unwrap(base_model))
    flags = {n: p.requires_grad for n, p in unwrap(base_model).named_parameters()}
    model = apply(base_model, plan, dropout=dropout, adapter_dtype=adapter_dtype)
    try:
        expected = adapter_state(model)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ValueError(
                f"{ADAPTER_FILE} does not match plan.json: missing tensors {missing[:5]}, "
                f"unexpected tensors {extra[:5]}; save the adapter again with el.save"
            )
        for key, t in expected.items():
            if tuple(tensors[key].shape) != tuple(t.shape):
                raise ValueError(
                    f"tensor {key!r} has shape {tuple(tensors[key].shape)} in {ADAPTER_FILE} but "
                    f"{tuple(t.shape)} in the model built from plan.json; the files do not belong "
                    "together"
                )
            if t.dtype == torch.bool and tensors[key].dtype != torch.bool:
                raise ValueError(f"tensor {key!r} must be a bool mask, got {tensors[key].dtype}")
        with torch.no_grad():
            for key, t in expected.items():
                t.copy_(tensors[key].to(device=t.device, dtype=t.dtype))
    except BaseException:
        remove_adapters(model, flags)
        raise
    return model


# -- peft export -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeftExport:
    """What ``export_peft`` wrote: the directory, the largest rank (vLLM's ``max_lora_rank``)."""

    path: Path
    max_lora_rank: int
    rank_pattern: dict[str, int] = field(default_factory=dict)


def export_peft(model: nn.Module, directory: str | os.PathLike) -> PeftExport:
    """Write a stock peft LoRA checkpoint of ``model``'s adapters (METHODS.md §6).

    Per module: materialised factors (shared factors copied, block-diagonal as ``diag(A_i)``,
    ``diag(B_i)``; VeRA/LoRI/FlexLoRA folded into plain A, B), the scale baked into B,
    ``lora_alpha == r`` and ``alpha_pattern == rank_pattern`` keyed by full module names, so
    every scaling is 1 in peft and vLLM alike. DoRA exports as peft DoRA (magnitude vectors).
    Files: ``adapter_config.json`` (from a peft ``LoraConfig``) and ``adapter_model.safetensors``.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    wrappers = adapted_modules(model)
    if not wrappers:
        raise ValueError("the model has no entrolora adapters to export; el.apply a plan first")
    if any(w.merged for w in wrappers.values()):
        raise ValueError("the adapters are merged into the base weights; el.unmerge(model) first")
    dora = {getattr(w.adapter, "kind", None) == "dora" for w in wrappers.values()}
    if len(dora) > 1:
        raise ValueError("peft cannot hold DoRA and plain LoRA modules in one adapter config")
    use_dora = dora.pop()

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    with torch.no_grad():
        for name, w in wrappers.items():
            a, b, scale = w.adapter.lora_factors()
            dtype = a.dtype
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = a.to(dtype).cpu().contiguous().clone()
            tensors[f"{prefix}.lora_B.weight"] = (b.float() * scale).to(dtype).cpu().contiguous()
            if use_dora:
                mag = w.adapter.magnitude.detach()
                tensors[f"{prefix}.lora_magnitude_vector"] = mag.cpu().contiguous().clone()
            ranks[name] = int(a.shape[0])
    max_rank = max(ranks.values())
    base = unwrap(model)
    config = LoraConfig(
        r=max_rank,
        lora_alpha=max_rank,
        target_modules=list(wrappers),
        rank_pattern=dict(ranks),
        alpha_pattern=dict(ranks),
        lora_dropout=0.0,
        bias="none",
        use_dora=use_dora,
        fan_in_fan_out=all(is_conv1d(w.base_layer) for w in wrappers.values()),
        base_model_name_or_path=getattr(getattr(base, "config", None), "_name_or_path", None)
        or None,
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".peft-config.") as tmp:
        config.save_pretrained(tmp)
        os.replace(Path(tmp) / "adapter_config.json", directory / ".adapter_config.json.tmp")
    atomic_write(
        directory / "adapter_model.safetensors",
        lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
    )
    os.replace(directory / ".adapter_config.json.tmp", directory / "adapter_config.json")
    return PeftExport(path=directory, max_lora_rank=max_rank, rank_pattern=ranks)


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
        target_modules=list(ranks),
        rank_pattern=ranks,
        lora_dropout=0.0,
        bias="none",
        use_dora=kinds == {"dora"},
    )
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


__all__ = ["PeftExport", "adapter_state", "export_peft", "load", "save", "to_peft_config"]

"""Export to an ordinary peft LoRA checkpoint (METHODS.md §6): ``export_peft``, ``to_peft_config``."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import atomic_write
from .inject import adapted_modules, unwrap
from .plans import AdaptationPlan
from .targets import is_conv1d


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


__all__ = ["PeftExport", "export_peft", "to_peft_config"]

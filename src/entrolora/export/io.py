"""Adapter checkpoints: ``save`` / ``load`` (safetensors + plan.json).

``adapter.safetensors`` holds every adapter parameter and persistent buffer (masks, frozen random
VeRA/LoRI matrices), each shared tensor once under ``"<group id>.<factor>"``, per-module tensors
under ``"<module name>.<factor>"``. No pickle anywhere: safetensors and JSON only; every file is
written atomically. The peft export (``export_peft``) lives in ``peft.py``, re-exported here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.inject import adapted_modules, apply, get_plan, remove_adapters, unwrap
from ..data.reading import read_tensors
from ..files import atomic_write, atomic_write_text
from ..guards.api import need_model, need_path
from ..guards.output import guard_folder, tensor_bytes
from ..plans import AdaptationPlan
from .peft import PeftExport, export_peft, to_peft_config  # re-exported: the old home

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

    need_model(model, "el.save")
    need_path(directory, "el.save")
    plan = get_plan(model)
    state = adapter_state(model)
    # refused inside a published run (its plan.json would change under it), unwritable or full
    directory = guard_folder(directory, "el.save", nbytes=tensor_bytes(state))
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in state.items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION}
    atomic_write(directory / ADAPTER_FILE, lambda tmp: save_file(tensors, tmp, metadata=meta))
    if flex is not None:
        atomic_write_text(directory / FLEX_FILE, json.dumps(flex.state_dict(), indent=1) + "\n")
    plan.save(directory / PLAN_FILE)
    return directory


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
    need_model(base_model, "el.load", "base_model")
    need_path(directory, "el.load")
    directory = Path(directory)
    if not (directory / PLAN_FILE).is_file():
        raise ValueError(
            f"{str(directory / PLAN_FILE)!r} does not exist; pass a directory written by el.save"
        )
    plan = AdaptationPlan.load(directory / PLAN_FILE)
    tensors = read_tensors(
        directory / ADAPTER_FILE, "adapter weights", "save the adapter again with el.save"
    )
    try:
        plan.validate(unwrap(base_model))
    except ValueError as e:
        raise ValueError(f"adapter {str(directory)!r} does not fit this model: {e}") from None
    flags = {n: p.requires_grad for n, p in unwrap(base_model).named_parameters()}
    # the saved tensors (LoRI masks included) are copied in below: nothing to calibrate
    model = apply(base_model, plan, dropout=dropout, adapter_dtype=adapter_dtype, for_loading=True)
    try:
        expected = adapter_state(model)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ValueError(
                f"{str(directory / ADAPTER_FILE)!r} does not match its plan.json: missing "
                f"tensors {missing[:5]}, unexpected tensors {extra[:5]}; save the adapter again "
                "with el.save"
            )
        for key, t in expected.items():
            if tuple(tensors[key].shape) != tuple(t.shape):
                raise ValueError(
                    f"tensor {key!r} has shape {tuple(tensors[key].shape)} in {ADAPTER_FILE} but "
                    f"{tuple(t.shape)} in the model built from plan.json (folder "
                    f"{str(directory)!r}); the files do not belong together: save the adapter again"
                )
            if t.dtype == torch.bool and tensors[key].dtype != torch.bool:
                raise ValueError(
                    f"tensor {key!r} in {str(directory / ADAPTER_FILE)!r} must be a bool mask, "
                    f"got {tensors[key].dtype}; save the adapter again with el.save"
                )
        with torch.no_grad():
            for key, t in expected.items():
                t.copy_(tensors[key].to(device=t.device, dtype=t.dtype))
    except BaseException:
        remove_adapters(model, flags)
        raise
    return model


__all__ = ["PeftExport", "adapter_state", "export_peft", "load", "save", "to_peft_config"]

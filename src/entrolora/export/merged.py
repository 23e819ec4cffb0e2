"""A full Hugging Face model folder, adapters folded in (or left out: the HF-format base that
vLLM and llama.cpp load an adapter export onto)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.inject import adapted_modules, merge, remove_adapters, unwrap
from ..guards.api import need_model, need_path
from ..guards.output import guard_folder
from ..progress import progress_bar
from .record import is_large


def _save_ready_tokenizer(tokenizer: Any) -> Any:
    """A copy of ``tokenizer`` whose saved config is JSON: loading options (a torch ``dtype``
    passed along with ``gguf_file``) end up in ``init_kwargs`` and break ``save_pretrained``."""
    tok = copy.copy(tokenizer)
    tok.init_kwargs = {
        k: v for k, v in tokenizer.init_kwargs.items() if not isinstance(v, torch.dtype)
    }
    return tok


def clear_quantization_markers(model: nn.Module) -> nn.Module:
    """Forget that ``model`` was dequantised from a GGUF file so transformers saves it as float.

    transformers refuses ``save_pretrained`` (and ``.float()``) on a GGUF-loaded model until its
    quantisation markers are cleared; the weights themselves are already dequantised floats.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    return model


def export_merged(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer: Any = None,
    *,
    merge_adapters: bool = True,
    progress: bool | None = None,
) -> Path:
    """Write a full Hugging Face model folder (safetensors + config, tokenizer when given).

    ``merge_adapters=True`` folds every adapter into its base weight (``el.merge`` on a copy: the
    given model keeps its adapters); ``False`` writes the base model without them — the
    HF-format base that vLLM and llama.cpp load an adapter export onto. Plain
    ``AutoModelFor….from_pretrained(directory)`` loads the result. Returns the directory.
    ``progress``: a bar over its stages (copy, merge, save); default: for models of
    ``LARGE_MODEL_PARAMS`` or more.
    """
    need_model(model, "el.export_merged")
    need_path(directory, "el.export_merged")
    base = unwrap(model)
    if merge_adapters and not adapted_modules(base):
        raise ValueError(
            "el.export_merged: the model has no entrolora adapters to merge, so the export would "
            "be the base model itself; el.apply or el.load an adapter first (merge_adapters=False "
            "writes the base model on purpose)"
        )
    if not hasattr(base, "save_pretrained"):
        raise ValueError(
            f"a {type(base).__name__} has no save_pretrained; merged export needs a transformers "
            "model (use el.merge(model) and torch.save for other models)"
        )
    if any(w.merged for w in adapted_modules(base).values()):
        raise ValueError("the adapters are merged into the base weights; el.unmerge(model) first")
    show = is_large(base) if progress is None else progress
    with progress_bar(3, "export merged" if merge_adapters else "export base", show,
                      unit="stage") as bar:  # fmt: skip
        out = copy.deepcopy(base)
        bar.update(1)
        if adapted_modules(out):
            if merge_adapters:
                merge(out)
            else:
                remove_adapters(out)
        clear_quantization_markers(out)
        bar.update(1)
        size = sum(t.numel() * t.element_size() for t in out.state_dict().values())
        directory = guard_folder(directory, "el.export_merged", "merged", size)
        out.save_pretrained(str(directory), safe_serialization=True)
        if tokenizer is not None:
            _save_ready_tokenizer(tokenizer).save_pretrained(str(directory))
        bar.update(1)
    return directory


__all__ = ["clear_quantization_markers", "export_merged"]

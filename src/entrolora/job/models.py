"""Which model a run uses: resolving the argument, loading it offline, families, default
targets, classification heads and the device."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import datasets as D
from ..probing.head import HEAD_NAMES, head_modules  # noqa: F401  (re-exported)
from .model_checks import check_model, loading_errors, model_name

DEFAULT_TARGETS = {
    "bert": ["attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj"],
}  # fmt: skip
FAMILY = {
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "electra": "bert",
    "camembert": "bert", "llama": "llama", "mistral": "llama", "qwen2": "llama",
    "qwen3": "llama", "gemma": "llama", "gemma2": "llama", "smollm3": "llama", "gpt2": "gpt2",
}  # fmt: skip


def default_targets(model: nn.Module) -> list[str]:
    """Default target modules by model family (BERT: attention q/k/v + attention output)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILY.get(model_type or "")
    if family is None:
        raise ValueError(
            f"no default target modules for model type {model_type!r}; pass --target-modules, "
            "e.g. --target-modules q_proj,v_proj"
        )
    return list(DEFAULT_TARGETS[family])


def like_lora_meta(model: nn.Module) -> dict[str, Any] | None:
    """What LoRA on the family's default targets costs per rank (``{"targets": [...],
    "params_per_rank": Σ d_in + d_out}``), recorded with the statistics for the auto planner's
    ``like-lora=R`` budget (METHODS.md §7); None for a family without default targets."""
    from ..targets import find_targets

    try:
        targets = default_targets(model)
    except ValueError:
        return None
    found = find_targets(model, targets).values()
    return {"targets": targets, "params_per_rank": sum(t.d_in + t.d_out for t in found)}


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ValueError for an unusable device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return dev


def resolve_model(model: str | None) -> tuple[Path, str | None]:
    """``(folder, gguf file name or None)`` of a model argument; errors name the fix."""
    if model is None or model in ("default", D.DEFAULT_MODEL):
        return D.minilm_path(), None
    if model == D.SMOLLM2:
        gguf = D.smollm2_gguf()
        return gguf.parent, gguf.name
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model folder {model!r} does not exist; pass a local Hugging Face folder (with "
            f"config.json), '{D.SMOLLM2}', or leave --model out for the embedded MiniLM"
        )
    if not (path / "config.json").is_file():
        if (path / "metrics.json").is_file():
            raise ValueError(
                f"{model!r} is an entrolora run, not a model; pass the base model's folder to "
                "--model (the run's metrics.json names it under config.model)"
            )
        if (path / "adapter_config.json").is_file() or (path / "plan.json").is_file():
            raise ValueError(
                f"{model!r} is an adapter, not a model; pass its base model's folder to --model "
                "(a peft adapter_config.json names it as base_model_name_or_path)"
            )
        raise ValueError(f"{model!r} has no config.json; pass a folder written by save_pretrained")
    return path.resolve(), None  # absolute: metrics and exports work from any directory


def model_label(model: str | None) -> str:
    """How ``metrics.json`` names the base model: its folder, or the embedded default."""
    if model in (None, "default"):
        return "default (all-MiniLM-L6-v2)"
    return str(resolve_model(model)[0])


def load_model(
    model: str | None,
    task: str,
    num_labels: int = 2,
    label_names: Sequence[str] = (),
    max_length: int | None = None,
) -> tuple[nn.Module, Any, str]:
    """``(model, tokenizer, family)`` from a local folder or embedded default, offline, float32.

    The loaded pair is checked (``model_checks.check_model``: tokenizer, task, ``max_length``).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()  # "newly initialized classifier" is expected
    transformers.logging.disable_progress_bar()  # per-shard loading bars drown ours
    path, gguf = resolve_model(model)
    kw: dict[str, Any] = {"local_files_only": True}
    if gguf:
        kw.update(gguf_file=gguf, dtype=torch.float32)
    # dtype is a model option: kept in the tokenizer's init_kwargs, it breaks save_pretrained
    tok_kw = {k: v for k, v in kw.items() if k != "dtype"}
    name = model_name(model)
    with loading_errors(name, task):
        tokenizer = D.prepare_tokenizer(AutoTokenizer.from_pretrained(str(path), **tok_kw))
        if task == "classify":
            kw.update(num_labels=num_labels)
            if label_names:
                kw.update(
                    id2label=dict(enumerate(label_names)),
                    label2id={n: i for i, n in enumerate(label_names)},
                )
            net = AutoModelForSequenceClassification.from_pretrained(str(path), **kw)
        else:
            net = AutoModelForCausalLM.from_pretrained(str(path), **kw)
    if gguf:  # transformers refuses .float(), save and peft on GGUF-loaded models until cleared
        net.hf_quantizer = None
        net.is_quantized = False
        if hasattr(net.config, "quantization_config"):
            del net.config.quantization_config
    net = net.float()
    if getattr(net.config, "pad_token_id", None) is None:
        net.config.pad_token_id = tokenizer.pad_token_id
    check_model(net, tokenizer, task, name, None if gguf else path, max_length)
    return net, tokenizer, FAMILY.get(getattr(net.config, "model_type", ""), "other")

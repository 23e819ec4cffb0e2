"""Which model a run uses: resolving the argument, loading it offline, families, default
targets, classification heads and the device."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import datasets as D
from ..probing.head import HEAD_NAMES, head_modules  # noqa: F401  (re-exported)

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

    The loaded pair is checked (``check_model``: tokenizer, task, ``max_length``).
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


# -- whether a model folder fits the job (tokenizer, task, position limit) ---------------------
# Files any of transformers' tokenizers is built from; only used to word the message.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model",
    "sentencepiece.bpe.model", "merges.txt", "bpe.codes",
)  # fmt: skip
POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")
HEADS = {"classify": "sequence-classification", "causal-lm": "causal-LM", "sft": "causal-LM"}


def model_name(model: str | None) -> str:
    """How messages call a ``--model`` argument: the user's own spelling, or the default."""
    from ..data import datasets as D

    if model is None or model in ("default", D.DEFAULT_MODEL):
        return "the embedded all-MiniLM-L6-v2"
    if model == D.SMOLLM2:
        return "the embedded SmolLM2-135M"
    return repr(str(model))


@contextlib.contextmanager
def loading_errors(name: str, task: str) -> Iterator[None]:
    """Turn transformers' loading failures (often many lines, naming no fix) into one line."""
    try:
        yield
    except Exception as e:
        if isinstance(e, ValueError) and "Unrecognized configuration class" in str(e):
            fix = (
                "use a decoder model (e.g. --model smollm2) or --task classify"
                if task in ("causal-lm", "sft")
                else "use a model with one, or --task causal-lm"
            )
            head = HEADS.get(task, task)
            raise ValueError(f"{name} has no {head} head in transformers; {fix}") from e
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(
                f"cannot load {name} ({first}); pass a folder written by save_pretrained, with "
                "its config, weights and tokenizer"
            ) from e
        raise


def check_model(
    net: nn.Module,
    tokenizer: Any,
    task: str,
    name: str,
    folder: Path | None = None,
    max_length: int | None = None,
) -> None:
    """All checks below; ``name`` is how messages call the model (its folder, or the default)."""
    check_tokenizer(net, tokenizer, name, folder)
    check_task(net, task, name)
    if max_length is not None:
        check_max_length(net, max_length, name)


def check_tokenizer(net: nn.Module, tokenizer: Any, name: str, folder: Path | None = None) -> None:
    """ValueError when the tokenizer cannot be the model's: far fewer tokens than the model has
    embeddings (an empty stand-in), or more (ids past the embedding table)."""
    n_tok = len(tokenizer)
    n_emb = int(net.get_input_embeddings().num_embeddings)
    fix = "save the model's own tokenizer next to it (tokenizer.save_pretrained(folder))"
    if 2 * n_tok < n_emb:  # padded embedding tables stay well within a factor of two
        has_files = folder is not None and any((folder / f).is_file() for f in TOKENIZER_FILES)
        why = (
            "holds a tokenizer for another model"
            if has_files or folder is None
            else "holds no tokenizer files, so transformers built an empty one"
        )
        raise ValueError(
            f"the tokenizer of {name} has {n_tok:,} tokens for {n_emb:,} embeddings: the folder "
            f"{why} and almost every word would become unknown; {fix}"
        )
    if n_tok > n_emb:
        raise ValueError(
            f"the tokenizer of {name} has {n_tok:,} tokens but the model only {n_emb:,} "
            f"embeddings: it belongs to another model; {fix}"
        )


def check_task(net: nn.Module, task: str, name: str) -> None:
    """ValueError when ``task`` is ``causal-lm`` and the model attends to later tokens."""
    if task not in ("causal-lm", "sft") or not attends_ahead(net):
        return
    model_type = getattr(getattr(net, "config", None), "model_type", None)
    raise ValueError(
        f"--task {task} needs a model that reads left to right, but {name} (model type "
        f"{model_type!r}) attends to later tokens too, so next-token training and its perplexity "
        "would be meaningless; use a decoder (--model smollm2, or a Llama/GPT-2/Qwen folder), "
        "or --task classify"
    )


@torch.no_grad()
def attends_ahead(net: nn.Module) -> bool:
    """True when changing the last token changes the outputs at earlier positions.

    Two forward passes of four tokens: architecture-agnostic (BERT-family models become
    left-to-right only with ``is_decoder``; this asks the model itself).
    """
    vocab = int(net.get_input_embeddings().num_embeddings)
    device = next(net.parameters()).device
    ids = torch.tensor([[1, 2, 3, 4]], device=device) % vocab
    other = ids.clone()
    other[0, -1] = 5 % vocab if vocab > 5 else 0
    was_training = net.training
    net.eval()
    try:
        a = net(input_ids=ids).logits[0, :-1].float()
        b = net(input_ids=other).logits[0, :-1].float()
    finally:
        net.train(was_training)
    return not torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def position_limit(net: nn.Module) -> int | None:
    """Tokens the model's learned position table holds; None when positions are computed
    (rotary, ALiBi) and there is no hard limit."""
    for module_name, module in net.named_modules():
        if isinstance(module, nn.Embedding) and module_name.rsplit(".", 1)[-1] in POSITION_TABLES:
            offset = int(getattr(module, "offset", 0) or 0)  # OPT starts its positions at 2
            if module.padding_idx is not None:  # RoBERTa: positions start after the pad id
                offset = max(offset, int(module.padding_idx) + 1)
            return int(module.num_embeddings) - offset
    return None


def check_max_length(net: nn.Module, max_length: int, name: str) -> None:
    """ValueError when ``max_length`` is beyond the model's position table."""
    limit = position_limit(net)
    if limit is not None and max_length > limit:
        raise ValueError(
            f"--max-length {max_length} is beyond the {limit} positions {name} has; pass "
            f"--max-length {limit} or less"
        )

"""Is this model folder fit for the job? One place for the checks every command runs on a model.

After ``load_model``: the tokenizer is the model's own and not an empty stand-in (a folder
without tokenizer files makes transformers build a 5-token vocabulary in which every word is
``[UNK]``); the task fits the architecture (``causal-lm`` needs a model that reads left to
right, tested on the model itself); ``--max-length`` fits the position-embedding table. Each
failure is one ``ValueError`` naming the model and the fix (docs/refusals.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

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

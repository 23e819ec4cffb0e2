"""``--task sft``: the job's instruction-tuning steps (data splits, batches, scores).

Training and the probe read ``model(**batch).loss`` on batches whose labels are ``-100`` off the
answer (``sft.collate``), grouped by length; the held-out split is scored by teacher
forcing: a row is an exact match when the argmax at every answer position, EOS included, is the
answer's token (what greedy decoding would emit, ``tests/test_sft.py`` compares them), and the
answer loss is the mean token loss over the answers. With a category column the scores are
also given per category.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..data import sft as S
from .config import TrainConfig

# The shipped default, sized for 2 CPU cores (docs/sft.md): SmolLM2-135M-Instruct on the math
# set, one epoch cut at max_steps, the first eval_limit test questions of a fixed shuffle.
SFT_DEFAULTS: dict[str, Any] = {
    "max_steps": 60, "batch_size": 16, "eval_batch_size": 32, "lr": 2e-3, "max_length": 96,
    "probe_steps": 8, "epochs": 1,
}  # fmt: skip
SFT_EVAL_LIMIT = 400
SFT_MODEL = "smollm2"


def sft_config(**kw: Any) -> TrainConfig:
    """A ``TrainConfig`` for ``--task sft`` with the shipped default's sizes (``kw`` wins)."""
    sft = kw.pop("sft", None) or S.SFTOptions(eval_limit=SFT_EVAL_LIMIT)
    base = {"model": SFT_MODEL, **SFT_DEFAULTS}
    return TrainConfig(task="sft", sft=sft, **{**base, **kw})


def _row_split(ds: S.SFTDataset, fraction: float, seed: int):
    if not 0 < fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {fraction}")
    if len(ds) < 2:
        raise ValueError(f"need at least 2 rows to split into train and test, got {len(ds)}")
    idx = list(range(len(ds)))
    random.Random(seed).shuffle(idx)
    n_test = max(1, round(fraction * len(ds)))
    return ds.take(sorted(idx[n_test:])), ds.take(sorted(idx[:n_test]))


def _subset(ds: S.SFTDataset, n: int | None, seed: int) -> S.SFTDataset:
    if n is None or n >= len(ds):
        return ds
    idx = list(range(len(ds)))
    random.Random(seed).shuffle(idx)
    return ds.take(sorted(idx[:n]))


def load_sft_splits(cfg: TrainConfig) -> tuple[S.SFTDataset, S.SFTDataset]:
    """``(train, held-out)`` rows: the shipped math set's train and ``--eval-split`` splits, or
    ``--data`` split by row (``test_fraction``, ``seed``). ``limit`` subsets the training rows;
    ``eval_limit`` the held-out ones, with a fixed shuffle (the same questions for every seed)."""
    o = cfg.sft
    if cfg.data in (None, "default"):
        train, test = S.load_math("train", o), S.load_math(o.eval_split, o)
    else:
        train, test = _row_split(S.load_sft(cfg.data, o), cfg.test_fraction, cfg.seed)
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"--limit must be ≥ 1, got {cfg.limit}")
    train = _subset(train, cfg.limit, cfg.seed)
    return train, _subset(test, o.eval_limit, 0)


def tokenize_splits(
    train: S.SFTDataset, test: S.SFTDataset, tokenizer: Any, cfg: TrainConfig
) -> tuple[S.SFTTokens, S.SFTTokens]:
    """Both splits as tokens (``sft.tokenize``: the length checks name the rows)."""
    tmpl = cfg.sft.chat_template
    return (S.tokenize(tokenizer, train, cfg.max_length, tmpl),
            S.tokenize(tokenizer, test, cfg.max_length, tmpl))  # fmt: skip


def train_batches(
    tokens: S.SFTTokens, batch_size: int, seed: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of length-grouped batches in a seeded random order."""
    for idx in S.grouped_batches(tokens.lengths, batch_size, seed):
        yield S.collate(tokens, idx, pad_id)


def _accepts(model: nn.Module, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def teacher_forced(
    model: nn.Module, tokens: S.SFTTokens, batch_size: int, device: torch.device, pad_id: int
) -> tuple[list[bool], list[float], list[int]]:
    """Per row (in ``tokens``' order): exact match, summed answer loss, answer tokens.

    Batches in length order, padded on the left so the answers end together; only the last
    ``longest answer + 1`` positions get logits when the model allows (``logits_to_keep``).
    """
    model.eval()
    keep, positions = _accepts(model, "logits_to_keep"), _accepts(model, "position_ids")
    cache = _accepts(model, "use_cache")
    n = len(tokens)
    ok, loss, count = [False] * n, [0.0] * n, [0] * n
    for idx in S.length_order_batches(tokens.lengths, batch_size):
        b = S.collate(tokens, idx, pad_id, left=True)
        k = max(len(tokens.completion_ids[i]) for i in idx) + 1
        inputs = {key: v.to(device) for key, v in b.items() if key != "labels"}
        if not positions:
            inputs.pop("position_ids")
        if cache:
            inputs["use_cache"] = False  # one pass: a key/value cache would only cost memory
        out = model(**inputs, logits_to_keep=k) if keep else model(**inputs)
        logits = out.logits[:, -k:-1].float()  # (batch, k-1, vocab): predicts the last k-1
        target = b["labels"][:, -(k - 1) :].to(logits.device)  # (batch, k-1)
        mask = target != S.IGNORE
        hit = (logits.argmax(-1) == target) | ~mask
        ce = nn.functional.cross_entropy(
            logits.transpose(1, 2), target, ignore_index=S.IGNORE, reduction="none"
        )  # (batch, k-1)
        for row, i in enumerate(idx):
            ok[i] = bool(hit[row].all())
            loss[i] = float(ce[row].sum())
            count[i] = int(mask[row].sum())
    return ok, loss, count


def evaluate_sft(
    model: nn.Module, tokens: S.SFTTokens, batch_size: int, device: torch.device, pad_id: int
) -> dict[str, Any]:
    """Held-out scores: ``exact_match`` (also as ``accuracy``), ``eval_loss`` (mean answer token
    loss, EOS included) and ``by_category`` ({category: exact_match, eval_loss, examples})."""
    if not len(tokens):
        raise ValueError("the held-out split holds no rows to score; use more data")
    ok, loss, count = teacher_forced(model, tokens, batch_size, device, pad_id)
    out = _scores(ok, loss, count)
    out = {**out, "accuracy": out["exact_match"], "answer_tokens": sum(count)}
    if tokens.categories is not None:
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(tokens.categories):
            groups.setdefault(c, []).append(i)
        out["by_category"] = {
            c: _scores([ok[i] for i in g], [loss[i] for i in g], [count[i] for i in g])
            for c, g in sorted(groups.items())
        }
    return out


def _scores(ok: list[bool], loss: list[float], count: list[int]) -> dict[str, Any]:
    return {
        "exact_match": sum(ok) / len(ok),
        "eval_loss": sum(loss) / max(1, sum(count)),
        "eval_examples": len(ok),
    }


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The run's SFT summary: exact match and answer loss, then one line per category."""
    em, n = metrics["exact_match"], metrics["eval_examples"]
    lines = [
        f"exact match {100 * em:.1f} % ({round(em * n)}/{n} held-out answers), answer loss "
        f"{metrics['eval_loss']:.3f}"
    ]
    for cat, s in (metrics.get("by_category") or {}).items():
        lines.append(
            f"  {cat:<40} {100 * s['exact_match']:5.1f} %  loss {s['eval_loss']:.3f}  "
            f"({s['eval_examples']} rows)"
        )
    return lines


def with_sft_defaults(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """``cfg`` with the shipped default's sizes for the fields the user did not give."""
    fill = {k: v for k, v in SFT_DEFAULTS.items() if k not in given}
    if "model" not in given and cfg.model is None:
        fill["model"] = SFT_MODEL
    shipped = cfg.data in (None, "default")
    if shipped and "eval_limit" not in given and cfg.sft.eval_limit is None:
        cfg = replace(cfg, sft=replace(cfg.sft, eval_limit=SFT_EVAL_LIMIT))
    return replace(cfg, **fill)

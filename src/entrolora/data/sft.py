"""Instruction-tuning data (``--task sft``): prompt → completion rows, their tokens and batches.

Rows follow TRL's conventions: a ``prompt`` and a ``completion`` column (text, or chat turns in
TRL's conversational form), or one ``messages`` column of chat turns whose last turn is the
assistant's answer. Tokens: the prompt rendered through the tokenizer's chat template when it has
one (``--chat-template auto``; ``none``: the prompt text as it is), then the completion's tokens
and an EOS that closes it. Labels are ``-100`` on the prompt and on padding, so
``model(**batch).loss`` is the mean loss over the completion tokens and the EOS, in training and
in the probe alike.

The shipped math set (``data/math/{train,validation,test}.jsonl.gz``, see its README) is what
``entrolora train --task sft`` uses without ``--data``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .tables import read_table

CHAT_TEMPLATES = ("auto", "none")
EVAL_SPLITS = ("test", "validation")
MATH_DIR = Path(__file__).resolve().parent / "math"
IGNORE = -100


@dataclass
class SFTOptions:
    """What ``--task sft`` reads: columns, the chat template and the held-out split."""

    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    category_column: str | None = None  # None: "category" when the data has that column
    chat_template: str = "auto"  # auto: the tokenizer's when it has one; none: plain text
    eval_split: str = "test"  # the shipped set's held-out split: test, or validation
    eval_limit: int | None = None  # score a seeded subset of this many held-out rows


@dataclass(frozen=True)
class SFTDataset:
    """Prompts (text, or chat turns ending before the answer), completions, optional categories."""

    prompts: list[Any]
    completions: list[str]
    categories: list[str] | None = None
    source: str = ""
    label_names: tuple[str, ...] = ()  # no classes: what run metrics read from every data set

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_labels(self) -> int:
        return 0

    def take(self, indices: Sequence[int]) -> SFTDataset:
        """The rows at ``indices``, in that order."""
        cats = self.categories
        return replace(
            self,
            prompts=[self.prompts[i] for i in indices],
            completions=[self.completions[i] for i in indices],
            categories=None if cats is None else [cats[i] for i in indices],
        )


# -- reading ------------------------------------------------------------------------------------
def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip())


def _turns(value: Any, where: str) -> list[dict[str, str]]:
    """Chat turns as ``[{"role", "content"}]``; ValueError naming ``where`` otherwise."""
    ok = isinstance(value, list) and all(
        isinstance(t, dict) and "role" in t and "content" in t for t in value
    )
    if not ok or not value:
        raise ValueError(f"{where} is not a list of chat turns ({{'role': ..., 'content': ...}})")
    return [{"role": str(t["role"]), "content": str(t["content"])} for t in value]


def _completion_text(value: Any, where: str) -> str:
    """A completion as text: a string, or TRL's one assistant turn ``[{"role", "content"}]``."""
    if isinstance(value, list):
        value = "".join(t["content"] for t in _turns(value, where))
    if _empty(value):
        raise ValueError(f"{where} is an empty completion; every row needs an answer to learn")
    return str(value)


def load_sft(path: str | os.PathLike, opts: SFTOptions | None = None) -> SFTDataset:
    """Read a CSV/TSV/JSONL/Parquet file of prompt/completion (or messages) rows.

    Errors (one line each): neither prompt+completion nor messages columns (the columns found
    are named), an empty prompt or completion, a messages row whose last turn is not the
    assistant's.
    """
    opts = opts or SFTOptions()
    path = Path(path)
    columns, rows = read_table(path)
    if not rows:
        raise ValueError(f"data file {str(path)!r} holds no rows")
    pc, cc, mc = opts.prompt_column, opts.completion_column, opts.messages_column
    has_pair = pc in columns and cc in columns
    if not has_pair and mc not in columns:
        missing = [c for c in (pc, cc) if c not in columns]
        raise ValueError(
            f"{path.name} has no {' or '.join(repr(c) for c in missing)} column (columns: "
            f"{', '.join(columns) or 'none'}); pass --prompt-column / --completion-column, or "
            f"give a {mc!r} column of chat turns"
        )
    cat = opts.category_column or ("category" if "category" in columns else None)
    if cat is not None and cat not in columns:
        raise ValueError(
            f"--category-column {cat!r} is not in {path.name} (columns: {', '.join(columns)})"
        )
    prompts, completions, cats = [], [], []
    for i, row in enumerate(rows, 1):
        where = f"row {i} of {path.name}"
        if has_pair:
            p = row.get(pc)
            if _empty(p):
                raise ValueError(f"{where} has an empty {pc!r}; remove or fill it")
            prompts.append(_turns(p, f"{where}'s {pc!r}") if isinstance(p, list) else str(p))
            completions.append(_completion_text(row.get(cc), f"{where}'s {cc!r}"))
        else:
            turns = _turns(row.get(mc), f"{where}'s {mc!r}")
            if turns[-1]["role"] != "assistant" or len(turns) < 2:
                raise ValueError(
                    f"{where}'s {mc!r} must end with an assistant turn after at least one "
                    "other turn (the answer to learn)"
                )
            prompts.append(turns[:-1])
            completions.append(_completion_text(turns[-1]["content"], f"{where}'s answer"))
        if cat is not None:
            cats.append(str(row.get(cat)))
    return SFTDataset(prompts, completions, cats if cat is not None else None, str(path))


def math_file(split: str) -> Path:
    """The shipped math set's file for ``split`` (train, validation, test)."""
    path = MATH_DIR / f"{split}.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(
            f"the shipped math set's {split} split {str(path)!r} is missing; reinstall "
            "entrolora, or pass --data with your own prompt/completion file"
        )
    return path


def load_math(split: str, opts: SFTOptions | None = None) -> SFTDataset:
    """One split of the shipped math set (prompt / completion / category)."""
    ds = load_sft(math_file(split), replace(opts or SFTOptions(), prompt_column="prompt",
                                             completion_column="completion",
                                             category_column="category"))  # fmt: skip
    return replace(ds, source=f"default:math/{split}")


# -- tokens -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SFTTokens:
    """Token ids per row: the rendered prompt and the completion closed by EOS."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    categories: list[str] | None = None
    source: str = ""
    label_names: tuple[str, ...] = ()
    lengths: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_labels(self) -> int:
        return 0

    def take(self, indices: Sequence[int]) -> SFTTokens:
        cats = self.categories
        return replace(
            self,
            prompt_ids=[self.prompt_ids[i] for i in indices],
            completion_ids=[self.completion_ids[i] for i in indices],
            categories=None if cats is None else [cats[i] for i in indices],
            lengths=[self.lengths[i] for i in indices],
        )


def uses_template(tokenizer: Any, chat_template: str) -> bool:
    """Whether prompts go through the tokenizer's chat template (``auto`` and it has one)."""
    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"--chat-template must be auto or none, got {chat_template!r}")
    return chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer: Any, prompt: Any, template: bool, where: str = "a prompt") -> list[int]:
    """The prompt's tokens: through the chat template (with the assistant's opening), or as text.

    Chat turns need a template; a template that cannot render them is a ValueError naming it.
    """
    if not template:
        if isinstance(prompt, list):
            raise ValueError(
                f"{where} holds chat turns but no chat template is used (the tokenizer has none, "
                "or --chat-template none); give plain-text prompts or a tokenizer with a template"
            )
        ids = list(tokenizer(str(prompt))["input_ids"])
        eos = tokenizer.eos_token_id
        return ids[:-1] if len(ids) > 1 and ids[-1] == eos else ids  # some tokenizers append EOS
    turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(
            f"the tokenizer's chat template cannot render {where} ({first}); fix the turns' "
            "roles or order, or pass --chat-template none"
        ) from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def completion_ids(tokenizer: Any, completion: str) -> list[int]:
    """The completion's tokens followed by EOS (what greedy decoding must reproduce)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to close completions; set eos_token")
    return list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [int(eos)]


def tokenize(tokenizer: Any, ds: SFTDataset, max_length: int, chat_template: str) -> SFTTokens:
    """Tokens of every row; ValueError when prompts, or whole rows, exceed ``max_length``."""
    template = uses_template(tokenizer, chat_template)
    where = f"row {{}} of {Path(ds.source).name or 'the data'}"
    ps = [prompt_ids(tokenizer, p, template, where.format(i + 1)) for i, p in enumerate(ds.prompts)]
    cs = [completion_ids(tokenizer, c) for c in ds.completions]
    check_lengths(ps, cs, max_length, ds.source)
    lengths = [len(p) + len(c) for p, c in zip(ps, cs)]
    return SFTTokens(ps, cs, ds.categories, ds.source, (), lengths)


def check_lengths(ps: list[list[int]], cs: list[list[int]], max_length: int, source: str) -> None:
    """ValueError naming how many rows are too long and how long, prompts first."""
    name = Path(source).name or source
    long_p = [len(p) for p in ps if len(p) >= max_length]
    if long_p:
        raise ValueError(
            f"{len(long_p)} of {len(ps)} rows of {name} have a prompt of --max-length "
            f"{max_length} tokens or more (longest {max(long_p)}), leaving no room for the "
            f"answer; raise --max-length above {max(long_p)} or drop those rows"
        )
    long_r = [len(p) + len(c) for p, c in zip(ps, cs) if len(p) + len(c) > max_length]
    if long_r:
        raise ValueError(
            f"{len(long_r)} of {len(ps)} rows of {name} are longer than --max-length "
            f"{max_length} tokens with their completion and EOS (longest {max(long_r)}); raise "
            f"--max-length to {max(long_r)} or drop those rows"
        )


# -- batches ------------------------------------------------------------------------------------
def collate(tokens: SFTTokens, idx: Sequence[int], pad_id: int, left: bool = False) -> dict:
    """One padded batch: ``input_ids``, ``attention_mask``, ``labels`` (-100 off the answer).

    ``left``: pad on the left (evaluation: the answers end together, as in batched generation)
    and add ``position_ids`` counted from each row's first real token.
    """
    seqs = [tokens.prompt_ids[i] + tokens.completion_ids[i] for i in idx]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
    for row, (i, s) in enumerate(zip(idx, seqs)):
        start = width - len(s) if left else 0
        n_p = len(tokens.prompt_ids[i])
        ids[row, start : start + len(s)] = torch.tensor(s)
        mask[row, start : start + len(s)] = 1
        labels[row, start + n_p : start + len(s)] = torch.tensor(tokens.completion_ids[i])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if left:
        batch["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    return batch


def grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, group: int = 50
) -> list[list[int]]:
    """Training batches of similar length, in a seeded random order.

    Shuffle, cut into chunks of ``group`` batches, sort each chunk by length and cut it into
    batches, then shuffle the batches (as transformers' ``group_by_length``): each batch pads to
    about its own length while every epoch still sees the rows in a new random mix.
    """
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    chunk = batch_size * group
    batches = []
    for start in range(0, len(idx), chunk):
        part = sorted(idx[start : start + chunk], key=lambda i: lengths[i])
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def length_order_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches in length order (ties keep their order)."""
    idx = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [idx[j : j + batch_size] for j in range(0, len(idx), batch_size)]


def trainer_collator(pad_id: int):
    """A data collator for HF ``Trainer`` over rows ``{"prompt_ids", "completion_ids"}`` (e.g.
    from ``tokens_as_rows``): right-padded batches with labels on the answers only."""

    def collate_rows(rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        toks = SFTTokens([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows])
        return collate(toks, range(len(rows)), pad_id)

    return collate_rows


def tokens_as_rows(tokens: SFTTokens) -> list[dict[str, list[int]]]:
    """``[{"prompt_ids", "completion_ids"}]``, one per row: a Trainer's training set."""
    return [{"prompt_ids": p, "completion_ids": c}
            for p, c in zip(tokens.prompt_ids, tokens.completion_ids)]  # fmt: skip

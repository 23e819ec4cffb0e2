"""Answers from a trained adapter (``entrolora generate``): a run folder, its adapter folder, or
an exported peft folder back onto the base model, prompts through the same chat template as in
training, greedy decoding by default."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import data as D
from ..data import sft as S
from ..data.reading import read_json


@dataclass
class Answerer:
    """A model with its adapter, its tokenizer and whether prompts use the chat template."""

    model: nn.Module
    tokenizer: Any
    template: bool
    source: str


def _base_of_peft(folder: Path, model: str | None) -> str | None:
    """The ``--model`` for a peft folder: given, the embedded SmolLM2, or a local folder."""
    from ..export.record import SMOLLM2_ID

    cfg = read_json(folder / "adapter_config.json", "peft adapter config", "export it again")
    task_type = cfg.get("task_type")
    if task_type != "CAUSAL_LM":
        raise ValueError(
            f"{str(folder)!r} is a peft adapter for task_type {task_type}; generate needs a "
            "CAUSAL_LM adapter (a run trained with --task sft or causal-lm)"
        )
    if model is not None:
        return model
    base = cfg.get("base_model_name_or_path")
    if base == SMOLLM2_ID:
        return D.SMOLLM2
    if base and Path(base).is_dir():
        return base
    raise ValueError(
        f"the peft adapter's base model {base!r} is not a local folder; pass --model with it"
    )


def load_answerer(
    path: str | os.PathLike,
    model: str | None = None,
    chat_template: str | None = None,
    device: str = "cpu",
) -> Answerer:
    """Load a run folder, an adapter folder (``plan.json``) or a peft folder for generation.

    The base model and chat-template choice default to the run's (its ``metrics.json``); a peft
    folder names its base model (``--model`` overrides) and uses ``auto``.
    """
    import entrolora as el

    from .models import load_model, resolve_device

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist; pass a run or peft folder")
    run = path if (path / "metrics.json").is_file() else path.parent
    rcfg: dict[str, Any] = {}
    if (run / "metrics.json").is_file():
        rcfg = read_json(run / "metrics.json", "run metrics", "pass --model").get("config", {})
    template = chat_template or (rcfg.get("sft") or {}).get("chat_template", "auto")
    adapter = path / "adapter" if (path / "adapter" / "plan.json").is_file() else path
    peft_dir = path / "peft" if (path / "peft" / "adapter_config.json").is_file() else path
    if (adapter / "plan.json").is_file():
        net, tokenizer, _ = load_model(model or rcfg.get("model"), "sft")
        net = el.load(net, adapter)
        source = str(adapter)
    elif (peft_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        net, tokenizer, _ = load_model(_base_of_peft(peft_dir, model or rcfg.get("model")), "sft")
        net = PeftModel.from_pretrained(net, str(peft_dir))
        source = str(peft_dir)
    else:
        raise ValueError(
            f"{str(path)!r} holds no adapter (no plan.json or adapter_config.json); pass a run "
            "folder written by `entrolora train`, its adapter/ or a peft export"
        )
    net.to(resolve_device(device)).eval()
    return Answerer(net, tokenizer, S.uses_template(tokenizer, template), source)


@torch.no_grad()
def generate(
    a: Answerer, prompts: Sequence[Any], max_new_tokens: int = 64, batch_size: int = 16
) -> list[str]:
    """Greedy answers to ``prompts`` (text or chat turns), in order, decoded up to EOS."""
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be ≥ 1, got {max_new_tokens}")
    tok = a.tokenizer
    ids = [S.prompt_ids(tok, p, a.template, f"prompt {i + 1}") for i, p in enumerate(prompts)]
    device = next(a.model.parameters()).device
    pad, eos = tok.pad_token_id, tok.eos_token_id
    answers: list[str] = [""] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # less padding per batch
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(ids[i]) for i in idx)
        batch = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for row, i in enumerate(idx):  # left padding: every prompt ends where generation starts
            batch[row, width - len(ids[i]) :] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]) :] = 1
        out = a.model.generate(input_ids=batch.to(device), attention_mask=mask.to(device),
                               do_sample=False, max_new_tokens=max_new_tokens,
                               eos_token_id=eos, pad_token_id=pad)  # fmt: skip
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            new = new[: new.index(eos)] if eos in new else new
            answers[i] = tok.decode(new, skip_special_tokens=True)
    return answers


def read_prompts(path: str | os.PathLike, prompt_column: str = "prompt") -> list[Any]:
    """Prompts of a data file: the prompt column, or a messages column without its last
    assistant turn (so that a training file can be answered as it is)."""
    from ..data.tables import read_table

    columns, rows = read_table(path)
    if prompt_column in columns:
        return [r[prompt_column] for r in rows]
    if "messages" in columns:
        turns = [r["messages"] for r in rows]
        return [t[:-1] if t and t[-1].get("role") == "assistant" else t for t in turns]
    raise ValueError(
        f"{Path(path).name} has no {prompt_column!r} or 'messages' column (columns: "
        f"{', '.join(columns) or 'none'}); pass --prompt-column"
    )

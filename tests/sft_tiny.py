"""Tiny instruction-tuning assets for the ``--task sft`` tests: a random Llama with a chat
template and a learnable prompt → completion file whose right answers are known."""

from __future__ import annotations

import json
import random
from pathlib import Path

from test_data import SPECIALS, WORDS, tiny_tokenizer

# Words as roles and markers, so that the template's text tokenizes to known words.
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}"
    "{% endif %}w70 {{ m['content'] }} w71 {% endfor %}{% if add_generation_prompt %}w72 "
    "{% endif %}"
)
CATEGORIES = ("sentiment", "copy")


def save_tiny_sft_model(root: Path, template: bool = True, seed: int = 0) -> Path:
    """A tiny random Llama causal LM with the WordLevel tokenizer (+ a chat template)."""
    from tiny import tiny_llama

    model = tiny_llama(layers=2, hidden=32, seed=seed)
    model.resize_token_embeddings(len(SPECIALS) + len(WORDS))
    model.config.pad_token_id = 0
    model.config.eos_token_id = SPECIALS.index("[EOS]")
    model.generation_config.eos_token_id = SPECIALS.index("[EOS]")
    model.generation_config.pad_token_id = 0
    path = root / ("tiny-sft" if template else "tiny-sft-plain")
    model.save_pretrained(path)
    tok = tiny_tokenizer()
    if template:
        tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    return path


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """Two kinds of rows: sentiment (answer ``good w1`` / ``bad w1`` from the cue in the prompt)
    and copy (answer: the prompt's first word)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS[:60]) for _ in range(rng.randint(2, 5))]
        if i % 2 == 0:
            pos = rng.random() < 0.5
            words.insert(rng.randint(0, len(words)), rng.choice(["great", "good"] if pos else
                                                                 ["awful", "bad"]))  # fmt: skip
            answer, cat = ("good w1" if pos else "bad w1"), "sentiment"
        else:
            answer, cat = words[0], "copy"
        rows.append({"prompt": " ".join(words), "completion": answer, "category": cat})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path

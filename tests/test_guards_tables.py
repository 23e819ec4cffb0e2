"""The data-table guard (tables.py, data.py; issue 34): duplicate column names refused in every
format, labels that differ only by case or spacing reported (merged only with --merge-labels),
splits too small to score refused with the numbers, and a CSV cell as long as JSON Lines allows.
``test_issue_*`` are the issue's cases, ``test_also_*`` cases it did not list."""

# ruff: noqa: F811  (the fixtures env and run come from test_bad_inputs)
from __future__ import annotations

import json

import pytest

from entrolora.data import datasets as D
from entrolora.data.tables import read_table
from test_bad_inputs import FAST, _rows, _write, env, invoke, nothing_left, refused  # noqa: F401

TRAIN = ("train", "--method", "lora", "--r", "2", *FAST)


def _csv(path, header: str, lines: list[str]):
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return path


# -- the issue's cases --------------------------------------------------------------------------
def test_issue_duplicate_column_is_refused(env, tmp_path):
    data = _csv(tmp_path / "dup.csv", "text,label,text", ["a b,pos,x y"] * 40)
    out = tmp_path / "out"
    r = invoke(*TRAIN, "--model", env["bert2"], "--data", data, "--output", out)
    refused(r, f"data file '{data}' has two columns named 'text' (columns 1, 3); rename one")
    nothing_left(out)


def test_issue_labels_differing_by_case_or_spacing(env, tmp_path):
    rows = _rows()
    spelled = ["pos", "Pos", "pos ", "neg"]
    data = _write(
        tmp_path / "case.csv", [{**r, "label": spelled[i % 4]} for i, r in enumerate(rows)]
    )
    out = tmp_path / "out"
    r = invoke(*TRAIN, "--model", env["bert2"], "--data", data, "--output", out)
    refused(r, "column 'label' of case.csv has labels that differ only by case or spacing "
            "('Pos', 'pos', 'pos '); fix the file, or pass --merge-labels")  # fmt: skip
    nothing_left(out)
    ds = D.load_data(data, merge_labels=True)
    assert ds.label_names == ("neg", "pos") and ds.labels == [1, 1, 1, 0] * 10
    r = invoke(*TRAIN, "--model", env["bert2"], "--data", data, "--output", out, "--merge-labels")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "metrics.json").read_text())["num_labels"] == 2


def test_issue_two_row_file_is_too_small_to_score(env, tmp_path):
    data = _csv(tmp_path / "two.csv", "text,label", ["good film,pos", "bad film,neg"])
    out = tmp_path / "out"
    r = invoke(*TRAIN, "--model", env["bert2"], "--data", data, "--output", out)
    refused(r, "2 rows split into 1 to train and 1 to test: too few to score (the held-out split "
            "needs at least 4 rows)")  # fmt: skip
    nothing_left(out)


def test_issue_long_csv_cell_reads_like_json_lines(tmp_path):
    long = "word " * 40_000  # 200 KB, beyond the csv module's default 128 KiB field limit
    rows = [{"text": long, "label": "pos"}, {"text": "short", "label": "neg"}]
    cols_csv, rows_csv = read_table(_write(tmp_path / "long.csv", rows))
    jl = tmp_path / "long.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert (cols_csv, rows_csv) == read_table(jl)


# -- cases the issue did not list ---------------------------------------------------------------
def test_also_duplicate_key_in_json_lines_and_tsv(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "a", "label": "x", "label": "y"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1 has the key 'label' twice; keep one"):
        read_table(jl)
    tsv = _csv(tmp_path / "d.tsv", "label\ttext\tlabel", ["a\tb\tc"])
    with pytest.raises(ValueError, match=r"two columns named 'label' \(columns 1, 3\)"):
        read_table(tsv)


def test_also_a_class_missing_from_a_split(tmp_path):
    ds = D.TextDataset([f"t{i}" for i in range(12)], [0] * 11 + [1], None, ("neg", "pos"))
    train, test = ds.take(range(8)), ds.take(range(8, 12))
    with pytest.raises(
        ValueError,
        match=r"12 rows split into 8 to train and 4 to test: the "
        r"training split has no example of class 'pos', so it cannot be learned",
    ):
        D.check_split_sizes(train, test)
    with pytest.raises(ValueError, match=r"the held-out split has no example of class 'pos'"):
        D.check_split_sizes(ds.take([0, 1, 2, 11]), ds.take([3, 4, 5, 6]))
    D.check_split_sizes(ds.take([0, 1, 11]), ds.take([2, 3, 4, 11]))  # both sides: accepted


def test_also_spacing_inside_a_label_and_unicode_case(tmp_path):
    raw = ["very good", "Very  Good", "bad", "STRASSE", "strasse"]
    assert D.same_label_spellings(raw) == [["STRASSE", "strasse"], ["Very  Good", "very good"]]
    codes, names = D._encode_labels(raw, merge=True)
    assert len(names) == 3 and codes[0] == codes[1] and codes[3] == codes[4]

"""Data loading, cleaning, label list, splitting and tokenization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lorafed.config import DataConfig
from lorafed.data.clean import load_labeled
from lorafed.data.read import read_table
from lorafed.data.tokens import TokenizedRows, split_indices
from lorafed.errors import DataError


def _cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), text_column="review", label_column="label", **kw)


def test_csv_jsonl_parquet_give_the_same_rows(tmp_path: Path, synthetic_csv: Path) -> None:
    frame = pd.read_csv(synthetic_csv)
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in frame.to_dict("records")) + "\n")
    parquet = tmp_path / "r.parquet"
    frame.to_parquet(parquet)
    loaded = [load_labeled(_cfg(p), seed=0) for p in (synthetic_csv, jsonl, parquet)]
    for other in loaded[1:]:
        assert other.texts == loaded[0].texts
        assert other.label_names == loaded[0].label_names == ("bad", "good", "meh")
        np.testing.assert_array_equal(other.labels, loaded[0].labels)


def test_missing_rows_are_dropped_and_counted_or_raise(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    pd.DataFrame({"review": ["fine", None, "  ", "good", "bad"], "label": ["a", "b", "a", None, "b"]}).to_csv(
        p, index=False
    )
    data = load_labeled(_cfg(p), seed=0)
    assert data.texts == ["fine", "bad"]
    assert data.dropped == {"empty or missing text in 'review'": 2, "missing label in 'label'": 1}
    assert list(data.source_rows) == [1, 5]
    with pytest.raises(DataError, match=r"m.csv, row 2, column 'review': empty or missing text \(2 such rows\)"):
        load_labeled(_cfg(p, missing="error"), seed=0)


def test_global_label_list_numeric_order_and_fixed_labels(tmp_path: Path) -> None:
    p = tmp_path / "n.csv"
    pd.DataFrame({"review": list("abcdef"), "label": [10, 2, 1, 2, 10, 1]}).to_csv(p, index=False)
    data = load_labeled(_cfg(p), seed=0)
    assert data.label_names == ("1", "2", "10")
    assert list(data.labels) == [2, 1, 0, 1, 2, 0]
    fixed = load_labeled(_cfg(p, labels=("1", "2", "10", "99")), seed=0)
    assert fixed.label_names == ("1", "2", "10", "99")  # a label no row has keeps its id
    with pytest.raises(DataError, match=r"row 1, column 'label': label '10' is not in data.labels"):
        load_labeled(_cfg(p, labels=("1", "2"), missing="error"), seed=0)
    dropped = load_labeled(_cfg(p, labels=("1", "2")), seed=0)
    assert len(dropped) == 4


def test_bad_inputs_name_the_problem(tmp_path: Path, synthetic_csv: Path) -> None:
    with pytest.raises(DataError, match=r"column 'Review Text': column not found; the file has: review, title"):
        load_labeled(DataConfig(path=str(synthetic_csv), text_column="Review Text", label_column="label"), seed=0)
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(DataError, match=r"unknown file type '.xlsx'"):
        read_table(odd)
    with pytest.raises(DataError, match="file not found"):
        read_table(tmp_path / "missing.csv")
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="file is empty"):
        read_table(empty)


def test_empty_after_filtering_and_one_class(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    pd.DataFrame({"review": [None, ""], "label": ["a", "b"]}).to_csv(p, index=False)
    with pytest.raises(DataError, match=r"no rows left after filtering \(2 read"):
        load_labeled(_cfg(p), seed=0)
    q = tmp_path / "y.csv"
    pd.DataFrame({"review": ["a", "b", "c"], "label": ["yes"] * 3}).to_csv(q, index=False)
    with pytest.raises(DataError, match=r"column 'label': only one class \('yes'\) in 3 rows"):
        load_labeled(_cfg(q), seed=0)


def test_max_rows_sample_is_seeded(synthetic_csv: Path) -> None:
    a = load_labeled(_cfg(synthetic_csv, max_rows=50), seed=3)
    b = load_labeled(_cfg(synthetic_csv, max_rows=50), seed=3)
    c = load_labeled(_cfg(synthetic_csv, max_rows=50), seed=4)
    assert len(a) == 50 and a.texts == b.texts and a.texts != c.texts


def test_split_is_deterministic_disjoint_and_complete() -> None:
    idx = np.arange(100, 200)
    s1 = split_indices(idx, 0.1, 0.2, seed=5)
    s2 = split_indices(idx, 0.1, 0.2, seed=5)
    assert (len(s1.train), len(s1.val), len(s1.test)) == (70, 10, 20)
    for a, b in zip((s1.train, s1.val, s1.test), (s2.train, s2.val, s2.test), strict=True):
        np.testing.assert_array_equal(a, b)
    union = np.concatenate([s1.train, s1.val, s1.test])
    assert sorted(union.tolist()) == idx.tolist()
    assert not np.array_equal(split_indices(idx, 0.1, 0.2, seed=6).test, s1.test)


def test_tokenized_rows_pairs_prefix_and_padding(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    p = tmp_path / "pairs.csv"
    pd.DataFrame(
        {"q": ["red dress", "running shoes size 9"], "prod": ["A red summer dress", None], "label": ["y", "n"]}
    ).to_csv(p, index=False)
    cfg = DataConfig(path=str(p), text_column="q", text_pair_column="prod", label_column="label")
    data = load_labeled(cfg, seed=0)
    rows = TokenizedRows(data, tok, max_length=16)
    batch = rows.batch([0, 1])
    expected = tok("red dress", "A red summer dress")["input_ids"]
    assert batch["input_ids"][0].tolist() == expected
    assert batch["token_type_ids"][0].tolist() == tok("red dress", "A red summer dress")["token_type_ids"]
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()  # second row is padded
    prefix = TokenizedRows(data, tok, max_length=16, pair_mode="prefix")
    assert prefix.input_ids[0] == tok("A red summer dress. red dress", truncation=True, max_length=16)["input_ids"]
    long = TokenizedRows(data, tok, max_length=8)
    assert max(len(x) for x in long.input_ids) == 8

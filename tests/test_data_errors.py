"""Bad data input: each case is a DataError naming file, row/line and field, or a counted skip."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafed.config import DataConfig
from lorafed.data.clean import load_labeled
from lorafed.errors import DataError

HEAD = "text,label\n"
GOOD = "".join(f"row {i} fine,{'ab'[i % 2]}\n" for i in range(6))


def cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


def write(tmp_path: Path, body: str | bytes, name: str = "d.csv") -> Path:
    p = tmp_path / name
    p.write_bytes(body if isinstance(body, bytes) else body.encode("utf-8"))
    return p


def test_malformed_csv_row_names_the_line(tmp_path: Path) -> None:
    p = write(tmp_path, HEAD + GOOD + "one,too,many\n" + GOOD)
    with pytest.raises(DataError, match=r"d\.csv: malformed CSV at line 8: expected 2 fields, saw 3 .*bad_lines: skip"):
        load_labeled(cfg(p), 0)


def test_malformed_csv_rows_skipped_and_counted(tmp_path: Path) -> None:
    p = write(tmp_path, HEAD + GOOD + "one,too,many\n" + GOOD + "x,y,z,w\n")
    data = load_labeled(cfg(p, bad_lines="skip"), 0)
    assert len(data) == 12
    assert data.dropped == {"malformed CSV lines (8, 15)": 2}


def test_wrong_encoding_names_the_line(tmp_path: Path) -> None:
    p = write(tmp_path, (HEAD + GOOD).encode() + "caf\u00e9 cr\u00e8me,a\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"d\.csv: not valid utf-8 text at line 8 .*set data.encoding"):
        load_labeled(cfg(p), 0)
    assert load_labeled(cfg(p, encoding="latin-1"), 0).texts[-1] == "caf\u00e9 cr\u00e8me"
    with pytest.raises(DataError, match=r"unknown text encoding 'klingon'"):
        load_labeled(cfg(p, encoding="klingon"), 0)


def test_empty_texts(tmp_path: Path) -> None:
    p = write(tmp_path, HEAD + GOOD + '"   ",a\n,b\n')
    with pytest.raises(DataError, match=r"d\.csv, row 7, column 'text': empty or missing text \(2 such rows\)"):
        load_labeled(cfg(p, missing="error"), 0)
    data = load_labeled(cfg(p), 0)
    assert len(data) == 6 and data.dropped == {"empty or missing text in 'text'": 2}


def test_label_not_in_label_list(tmp_path: Path) -> None:
    p = write(tmp_path, HEAD + GOOD + "odd one,zzz\n")
    with pytest.raises(DataError, match=r"row 7, column 'label': label 'zzz' is not in data.labels \['a', 'b'\]"):
        load_labeled(cfg(p, labels=("a", "b"), missing="error"), 0)
    data = load_labeled(cfg(p, labels=("a", "b")), 0)
    assert len(data) == 6 and data.dropped == {"label not in data.labels in 'label'": 1}


def test_missing_column(tmp_path: Path) -> None:
    p = write(tmp_path, HEAD + GOOD)
    with pytest.raises(DataError, match=r"d\.csv, column 'review': column not found; the file has: text, label"):
        load_labeled(cfg(p, text_column="review"), 0)


def test_empty_file_and_header_only(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"d\.csv: file is empty"):
        load_labeled(cfg(write(tmp_path, "")), 0)
    with pytest.raises(DataError, match=r"h\.csv: no rows left after filtering \(0 read"):
        load_labeled(cfg(write(tmp_path, HEAD, "h.csv")), 0)
    with pytest.raises(DataError, match=r"n\.csv: file has no header or rows"):
        load_labeled(cfg(write(tmp_path, "\n\n", "n.csv")), 0)


def test_huge_field(tmp_path: Path) -> None:
    p = write(tmp_path, HEAD + GOOD + "x" * 5000 + ",a\n")
    with pytest.raises(DataError, match=r"row 7, column 'text': text over 1000 characters \(1 such rows\)"):
        load_labeled(cfg(p, max_chars_per_field=1000, missing="error"), 0)
    data = load_labeled(cfg(p, max_chars_per_field=1000), 0)
    assert len(data) == 6 and data.dropped == {"text over 1000 characters in 'text'": 1}
    assert len(load_labeled(cfg(p), 0)) == 7  # the default bound (100 000) lets it through


def test_jsonl_bad_line(tmp_path: Path) -> None:
    p = write(tmp_path, '{"text": "a b", "label": "a"}\n{"text": oops}\n', "d.jsonl")
    with pytest.raises(DataError, match=r"d\.jsonl, row 2: not valid JSON"):
        load_labeled(cfg(p), 0)

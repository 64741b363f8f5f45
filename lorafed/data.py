"""Data: read a labelled table, clean it, fix the global label list, split and tokenize.

Nothing here knows any data set's column names or label values: the config names them.
Errors name the file, the row (1-based, header excluded) and the column.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lorafed.config import DataConfig
from lorafed.errors import DataError

_READERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass(frozen=True)
class LabeledData:
    """Clean rows, aligned by position.

    Attributes:
        texts: First text of each row.
        pairs: Second text of each row ("" where absent), or ``None`` without a pair column.
        labels: Label id of each row, an index into ``label_names``.
        label_names: The global label list, fixed before partitioning.
        columns: Extra columns asked for (e.g. the natural partition column), as object arrays
            with ``None`` where the value is missing.
        source_rows: 1-based row number of each row in the file, for messages.
        dropped: Count of rows dropped, by reason.
        path: The file read.
    """

    texts: list[str]
    pairs: list[str] | None
    labels: np.ndarray
    label_names: tuple[str, ...]
    columns: dict[str, np.ndarray]
    source_rows: np.ndarray
    dropped: dict[str, int] = field(default_factory=dict)
    path: str = ""

    def __len__(self) -> int:
        return len(self.texts)


def read_table(path: str | Path, fmt: str = "auto", encoding: str = "utf-8", bad_lines: str = "error") -> pd.DataFrame:
    """Read a CSV, JSONL or Parquet file into a DataFrame of strings and numbers.

    Args:
        path: The file.
        fmt: ``auto`` (from the extension), ``csv``, ``jsonl`` or ``parquet``.
        encoding: Text encoding for CSV and JSONL.
        bad_lines: CSV lines with the wrong number of fields: ``error`` or ``skip``. Skipped
            line numbers (1-based, header included) are in ``frame.attrs["skipped_lines"]``.

    Raises:
        DataError: Missing file, unknown type, empty file, undecodable text (naming the line),
            malformed rows (naming the line).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"file not found (resolved to {p.resolve()})", path=str(p))
    kind = fmt
    if fmt == "auto":
        kind = _READERS.get(p.suffix.lower(), "")
        if not kind:
            raise DataError(
                f"unknown file type {p.suffix or '(no extension)'!r}; expected one of "
                f"{', '.join(sorted(_READERS))} or set data.format",
                path=str(p),
            )
    if p.stat().st_size == 0:
        raise DataError("file is empty", path=str(p))
    try:
        if kind == "csv":
            return _read_csv(p, "\t" if p.suffix.lower() == ".tsv" else ",", encoding, bad_lines)
        if kind == "jsonl":
            return _read_jsonl(p, encoding)
        return pd.read_parquet(p)
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        line = _first_undecodable_line(p, encoding)
        where = f"at line {line}" if line is not None else f"near byte {exc.start}"
        raise DataError(
            f"not valid {encoding} text {where} ({exc.reason}); set data.encoding (e.g. latin-1)", path=str(p)
        ) from exc
    except LookupError as exc:
        raise DataError(f"unknown text encoding {encoding!r} (data.encoding)", path=str(p)) from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError("file has no header or rows", path=str(p)) from exc
    except pd.errors.ParserError as exc:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if m:
            raise DataError(
                f"malformed CSV at line {m.group(2)}: expected {m.group(1)} fields, saw {m.group(3)} "
                "(quote fields that hold the separator, or set data.bad_lines: skip)",
                path=str(p),
            ) from exc
        raise DataError(f"malformed CSV: {exc}".strip(), path=str(p)) from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read as {kind}: {exc}", path=str(p)) from exc


def _read_csv(p: Path, sep: str, encoding: str, bad_lines: str) -> pd.DataFrame:
    if bad_lines == "error":
        return pd.read_csv(p, sep=sep, encoding=encoding, dtype=str, keep_default_na=True)
    # pandas reports skipped lines as one ParserWarning; record it here (this call only) to count them.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        frame = pd.read_csv(p, sep=sep, encoding=encoding, dtype=str, keep_default_na=True, on_bad_lines="warn")
    skipped = [int(n) for w in caught for n in re.findall(r"Skipping line (\d+)", str(w.message))]
    for w in caught:
        if not issubclass(w.category, pd.errors.ParserWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    frame.attrs["skipped_lines"] = skipped
    return frame


def _first_undecodable_line(p: Path, encoding: str) -> int | None:
    """1-based number of the first line that does not decode (None if lines cannot be told apart)."""
    try:
        with open(p, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    raw.decode(encoding)
                except UnicodeDecodeError:
                    return lineno
    except (OSError, LookupError):
        return None
    return None


def _read_jsonl(p: Path, encoding: str) -> pd.DataFrame:
    records: list[dict[str, Any]] = []
    with open(p, encoding=encoding) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"not valid JSON: {exc.msg} at column {exc.colno}", path=str(p), row=lineno) from exc
            if not isinstance(obj, dict):
                raise DataError(f"expected a JSON object, got {type(obj).__name__}", path=str(p), row=lineno)
            records.append(obj)
    if not records:
        raise DataError("file has no records", path=str(p))
    return pd.DataFrame.from_records(records)


def load_labeled(cfg: DataConfig, seed: int, extra_columns: Sequence[str] = ()) -> LabeledData:
    """Read ``cfg.path`` and return clean, labelled rows with the global label list.

    Args:
        cfg: The data section of the config.
        seed: Seed for the ``max_rows`` sample.
        extra_columns: Further columns to carry along (e.g. a partition column).

    Raises:
        DataError: For a missing column, rows with missing values under ``missing: error``,
            labels outside ``cfg.labels`` under ``missing: error``, no rows left, or one class.
    """
    frame = read_table(cfg.path, cfg.format, cfg.encoding, cfg.bad_lines)
    path = str(cfg.path)
    wanted = [
        cfg.text_column,
        cfg.label_column,
        *([cfg.text_pair_column] if cfg.text_pair_column else []),
        *extra_columns,
    ]
    for col in wanted:
        if col not in frame.columns:
            raise DataError(
                f"column not found; the file has: {', '.join(map(str, frame.columns))}", path=path, field=col
            )
    texts = _as_text(frame[cfg.text_column])
    labels = [_label_str(v) for v in frame[cfg.label_column].tolist()]
    rows = np.arange(1, len(frame) + 1)
    bad_text = np.array([t is None for t in texts], dtype=bool)
    bad_label = np.array([lab is None for lab in labels], dtype=bool)
    dropped: dict[str, int] = {}
    if frame.attrs.get("skipped_lines"):
        lines = frame.attrs["skipped_lines"]
        shown = ", ".join(map(str, lines[:10])) + (", ..." if len(lines) > 10 else "")
        dropped[f"malformed CSV lines ({shown})"] = len(lines)
    limit = cfg.max_chars_per_field
    checks = [
        (bad_text, cfg.text_column, "empty or missing text"),
        (bad_label, cfg.label_column, "missing label"),
        (
            np.array([t is not None and len(t) > limit for t in texts], dtype=bool),
            cfg.text_column,
            f"text over {limit} characters",
        ),
        (
            np.array([x is not None and len(x) > limit for x in labels], dtype=bool),
            cfg.label_column,
            f"label over {limit} characters",
        ),
    ]
    if cfg.text_pair_column:
        pair_len = [p is not None and len(p) > limit for p in _as_text(frame[cfg.text_pair_column])]
        checks.append((np.array(pair_len, dtype=bool), cfg.text_pair_column, f"text over {limit} characters"))
    for mask, col, what in checks:
        if mask.any():
            if cfg.missing == "error":
                first = int(rows[mask][0])
                raise DataError(
                    f"{what} ({int(mask.sum())} such rows); set data.missing: drop to skip them",
                    path=path,
                    row=first,
                    field=col,
                )
            dropped[f"{what} in {col!r}"] = int(mask.sum())
    keep = ~np.logical_or.reduce([mask for mask, _, _ in checks])
    if cfg.labels is not None:
        allowed = set(cfg.labels)
        unknown = np.array([lab is not None and lab not in allowed for lab in labels])
        if unknown.any():
            if cfg.missing == "error":
                i = int(np.flatnonzero(unknown)[0])
                raise DataError(
                    f"label {labels[i]!r} is not in data.labels {list(cfg.labels)}",
                    path=path,
                    row=int(rows[i]),
                    field=cfg.label_column,
                )
            dropped[f"label not in data.labels in {cfg.label_column!r}"] = int((unknown & keep).sum())
            keep &= ~unknown
    idx = np.flatnonzero(keep)
    if len(idx) == 0:
        raise DataError(f"no rows left after filtering ({len(frame)} read; dropped: {dropped or 'none'})", path=path)
    if cfg.max_rows is not None and len(idx) > cfg.max_rows:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(idx, size=cfg.max_rows, replace=False))
    kept_labels = [labels[i] for i in idx]
    label_names = tuple(cfg.labels) if cfg.labels is not None else _sorted_labels(set(kept_labels))
    if len(set(kept_labels)) < 2 and cfg.labels is None:
        raise DataError(
            f"only one class ({kept_labels[0]!r}) in {len(idx)} rows; a classifier needs at least 2",
            path=path,
            field=cfg.label_column,
        )
    lookup = {name: i for i, name in enumerate(label_names)}
    pairs = None
    if cfg.text_pair_column:
        raw_pairs = _as_text(frame[cfg.text_pair_column])
        pairs = [raw_pairs[i] or "" for i in idx]
    columns = {}
    for col in extra_columns:
        values = frame[col].tolist()
        columns[col] = np.array([None if _is_missing(values[i]) else str(values[i]) for i in idx], dtype=object)
    return LabeledData(
        texts=[texts[i] for i in idx],  # type: ignore[misc]
        pairs=pairs,
        labels=np.array([lookup[lab] for lab in kept_labels], dtype=np.int64),
        label_names=label_names,
        columns=columns,
        source_rows=rows[idx],
        dropped=dropped,
        path=path,
    )


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return bool(pd.isna(value)) if not isinstance(value, (list, dict, tuple)) else False


def _as_text(series: pd.Series) -> list[str | None]:
    out: list[str | None] = []
    for v in series.tolist():
        if _is_missing(v):
            out.append(None)
            continue
        s = str(v).strip()
        out.append(s or None)
    return out


def _label_str(value: Any) -> str | None:
    if _is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    s = str(value).strip()
    return s or None


def _sorted_labels(values: set[str]) -> tuple[str, ...]:
    """Numeric labels sort as numbers ("2" before "10"); others sort as strings."""
    try:
        return tuple(sorted(values, key=float))
    except ValueError:
        return tuple(sorted(values))


@dataclass(frozen=True)
class Split:
    """Row positions of one client's train, validation and test parts."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_indices(indices: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> Split:
    """Shuffle ``indices`` with ``seed`` and cut them into train, validation and test.

    Every part of a client with at least 3 rows is non-empty when its fraction is positive.
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(np.asarray(indices, dtype=np.int64))
    n = len(perm)
    n_test = round(n * test_fraction)
    n_val = round(n * val_fraction)
    if n >= 3:
        n_test = max(n_test, 1) if test_fraction > 0 else 0
        n_val = max(n_val, 1) if val_fraction > 0 else 0
    n_train = max(n - n_test - n_val, 0)
    return Split(
        train=np.sort(perm[:n_train]),
        val=np.sort(perm[n_train : n_train + n_val]),
        test=np.sort(perm[n_train + n_val :]),
    )


class TokenizedRows:
    """Every row tokenized once; clients and rounds slice it by position (no re-tokenizing)."""

    def __init__(self, data: LabeledData, tokenizer: Any, max_length: int, pair_mode: str = "pair") -> None:
        first = data.texts
        second = data.pairs
        if second is not None and pair_mode == "prefix":
            first = [f"{p}. {t}" if p else t for t, p in zip(data.texts, second, strict=True)]
            second = None
        enc = tokenizer(
            first,
            second,
            truncation=True if second is None else "longest_first",
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
        )
        self.input_ids: list[list[int]] = enc["input_ids"]
        self.token_type_ids: list[list[int]] | None = enc.get("token_type_ids")
        self.labels = torch.as_tensor(data.labels, dtype=torch.long)
        self.pad_id = int(tokenizer.pad_token_id or 0)

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, positions: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Pad the rows at ``positions`` to their longest and return model inputs with labels."""
        pos = [int(i) for i in positions]
        width = max(len(self.input_ids[i]) for i in pos)
        ids = torch.full((len(pos), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(pos), width), dtype=torch.long)
        types = torch.zeros((len(pos), width), dtype=torch.long)
        for r, i in enumerate(pos):
            seq = self.input_ids[i]
            ids[r, : len(seq)] = torch.as_tensor(seq)
            mask[r, : len(seq)] = 1
            if self.token_type_ids is not None:
                types[r, : len(seq)] = torch.as_tensor(self.token_type_ids[i])
        out = {"input_ids": ids, "attention_mask": mask, "labels": self.labels[pos]}
        if self.token_type_ids is not None:
            out["token_type_ids"] = types
        return out

    def batches(
        self, positions: np.ndarray, batch_size: int, shuffle_seed: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield padded batches over ``positions``, shuffled by ``shuffle_seed`` if given."""
        pos = np.asarray(positions, dtype=np.int64)
        if shuffle_seed is not None:
            pos = np.random.default_rng(shuffle_seed).permutation(pos)
        for start in range(0, len(pos), batch_size):
            yield self.batch(pos[start : start + batch_size])

"""Clean rows: drop or refuse missing/oversized fields, fix the global label list.

Nothing here knows any data set's column names or label values: the config names them.
Errors name the file, the row (1-based, header excluded) and the column.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lorafed.data.read import read_table

if TYPE_CHECKING:
    from lorafed.config import DataConfig
from lorafed.errors import DataError


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

    def subset(self, positions: np.ndarray) -> LabeledData:
        """The rows at ``positions`` (in that order), with the same label list."""
        pos = np.asarray(positions, dtype=np.int64)
        return LabeledData(
            texts=[self.texts[i] for i in pos],
            pairs=None if self.pairs is None else [self.pairs[i] for i in pos],
            labels=self.labels[pos],
            label_names=self.label_names,
            columns={k: v[pos] for k, v in self.columns.items()},
            source_rows=self.source_rows[pos],
            dropped=dict(self.dropped),
            path=self.path,
        )


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
    _require_columns(frame, path, wanted)
    for col in (cfg.text_column, *([cfg.text_pair_column] if cfg.text_pair_column else [])):
        _require_scalar_text(frame[col], path, col)
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


def unlabeled_texts(
    frame: pd.DataFrame, path: str, text_column: str, pair_column: str | None = None
) -> tuple[list[str], list[str] | None, int]:
    """The texts of a table without labels, cleaned as :func:`load_labeled` cleans them.

    Rows whose text is missing or blank are left out (and counted); a missing second text is "".

    Returns:
        The texts, their second texts (``None`` without ``pair_column``), and the rows left out.

    Raises:
        DataError: A column is missing, or holds something other than strings.
    """
    columns = [text_column, *([pair_column] if pair_column else [])]
    _require_columns(frame, path, columns)
    for col in columns:
        _require_scalar_text(frame[col], path, col)
    texts = _as_text(frame[text_column])
    keep = [i for i, t in enumerate(texts) if t is not None]
    pairs = None
    if pair_column:
        raw_pairs = _as_text(frame[pair_column])
        pairs = [raw_pairs[i] or "" for i in keep]
    return [texts[i] for i in keep], pairs, len(texts) - len(keep)  # type: ignore[misc]


def _require_columns(frame: pd.DataFrame, path: str, columns: Sequence[str]) -> None:
    """Refuse a table without one of ``columns``, naming it and the columns the file has."""
    for col in columns:
        if col not in frame.columns:
            raise DataError(
                f"column not found; the file has: {', '.join(map(str, frame.columns))}", path=path, field=col
            )


def _require_scalar_text(series: pd.Series, path: str, col: str) -> None:
    """Refuse a text column holding anything but strings (Parquet lists, bytes, numbers, structs).

    Raises:
        DataError: Naming the column, the first offending row and the type found there.
    """
    for row, value in enumerate(series.tolist(), start=1):
        if isinstance(value, str) or value is None or value is pd.NA or value is pd.NaT:
            continue
        if isinstance(value, (float, np.floating)) and math.isnan(value):
            continue
        kind = "list" if isinstance(value, (np.ndarray, list, tuple)) else type(value).__name__
        shown = reprlib.repr(value.tolist() if isinstance(value, np.ndarray) else value)
        raise DataError(
            f"a text column must hold strings, found {kind} {shown}",
            path=path,
            row=row,
            field=col,
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

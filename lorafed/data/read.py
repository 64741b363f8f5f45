"""Read a labelled table (CSV, TSV, JSONL, Parquet) into a DataFrame, naming the file and row on errors."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from lorafed.errors import DataError

_READERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def read_table(path: str | Path, fmt: str = "auto", encoding: str = "utf-8", bad_lines: str = "error") -> pd.DataFrame:
    """Read a CSV, JSONL or Parquet file into a DataFrame of strings and numbers.

    CSV fields are read as written: only an empty field is missing, so labels such as ``None``,
    ``NA`` or ``null`` stay strings (pandas' default would read them as missing).

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
        return pd.read_csv(p, sep=sep, encoding=encoding, dtype=str, keep_default_na=False, na_values=[""])
    # pandas reports skipped lines as one ParserWarning; record it here (this call only) to count them.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        frame = pd.read_csv(
            p, sep=sep, encoding=encoding, dtype=str, keep_default_na=False, na_values=[""], on_bad_lines="warn"
        )
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
            except RecursionError as exc:
                raise DataError("JSON nested too deep to read", path=str(p), row=lineno) from exc
            except ValueError as exc:  # e.g. an integer of more digits than Python converts
                raise DataError(f"unreadable JSON value: {str(exc)[:120]}", path=str(p), row=lineno) from exc
            if not isinstance(obj, dict):
                raise DataError(f"expected a JSON object, got {type(obj).__name__}", path=str(p), row=lineno)
            records.append(obj)
    if not records:
        raise DataError("file has no records", path=str(p))
    return pd.DataFrame.from_records(records)

"""Read a labelled table (CSV, TSV, JSONL, Parquet) into a DataFrame, naming the file and row on errors."""

from __future__ import annotations

import csv
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
    _check_format(p, kind, encoding)
    try:
        if kind == "csv":
            sep = "\t" if p.suffix.lower() == ".tsv" else ","
            _check_csv_header(p, sep, encoding)
            return _read_csv(p, sep, encoding, bad_lines)
        if kind == "jsonl":
            return _read_jsonl(p, encoding)
        return _read_parquet(p)
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
        raise DataError(f"malformed CSV: {_one_line(exc)}".strip(), path=str(p)) from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read as {kind}: {_one_line(exc)}", path=str(p)) from exc


#: First bytes of binary formats that are not the text a CSV or JSONL file should hold.
_MAGIC = {
    b"PK\x03\x04": "a zip archive (or an .xlsx/.docx file)",
    b"PK\x05\x06": "an empty zip archive",
    b"\x1f\x8b": "a gzip file",
    b"BZh": "a bzip2 file",
    b"\xfd7zXZ\x00": "an xz file",
    b"\x28\xb5\x2f\xfd": "a zstd file",
    b"PAR1": "a Parquet file",
    b"\x80\x04": "a Python pickle",
    b"\x80\x05": "a Python pickle",
    b"SQLite format 3\x00": "an SQLite database",
    b"%PDF": "a PDF document",
    b"\xd0\xcf\x11\xe0": "an old Excel/Office file",
}

#: Bytes scanned per read when looking for NUL bytes (bounded memory for any file size).
_CHUNK = 1 << 20


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's text on one line, cut to ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _check_format(p: Path, kind: str, encoding: str) -> None:
    """Refuse a file whose bytes are not the format its extension (or data.format) says.

    Raises:
        DataError: A binary file (zip, gzip, Parquet, pickle...) read as CSV/JSONL, a NUL byte in
            a text file (naming the line), or a Parquet file without its magic bytes.
    """
    with open(p, "rb") as fh:
        head = fh.read(16)
        if kind == "parquet":
            tail = b""
            if p.stat().st_size >= 8:
                fh.seek(-4, 2)
                tail = fh.read(4)
            if head[:4] != b"PAR1" or tail != b"PAR1":
                found = next((what for magic, what in _MAGIC.items() if head.startswith(magic)), "")
                also = f"; it looks like {found}" if found else ""
                raise DataError(f"not a Parquet file (no PAR1 magic bytes at its start and end){also}", path=str(p))
            return
        for magic, what in _MAGIC.items():
            if head.startswith(magic):
                raise DataError(
                    f"this is {what}, not {kind} text; unpack or convert it, or set data.format", path=str(p)
                )
        try:
            ascii_nul = "\x00".encode(encoding) == b"\x00"
        except LookupError:
            return  # read_table names the unknown encoding
        if not ascii_nul:  # e.g. UTF-16, where zero bytes are part of every ASCII character
            return
        fh.seek(0)
        line = 1
        while chunk := fh.read(_CHUNK):
            at = chunk.find(b"\x00")
            if at >= 0:
                line += chunk.count(b"\n", 0, at)
                raise DataError(
                    f"NUL byte at line {line}: not {kind} text (a binary file, or text in another "
                    "encoding such as UTF-16: set data.encoding)",
                    path=str(p),
                )
            line += chunk.count(b"\n")


def _check_csv_header(p: Path, sep: str, encoding: str) -> None:
    """Refuse a CSV header that names one column twice (pandas would rename the second ``x.1``).

    Raises:
        DataError: Naming the duplicated column.
    """
    try:
        with open(p, encoding=encoding, newline="") as fh:
            header = next(csv.reader(fh, delimiter=sep), [])
    except (csv.Error, UnicodeDecodeError, LookupError, OSError):
        return  # the full read names the problem
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataError("the header names this column twice; rename one of them", path=str(p), field=name)
        seen.add(name)


def _read_parquet(p: Path) -> pd.DataFrame:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pandas names its missing engine itself
        return pd.read_parquet(p)
    names = pq.read_schema(p).names
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError("the file has two columns of this name; rename one of them", path=str(p), field=name)
        seen.add(name)
    return pd.read_parquet(p)


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
                obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
            except _DuplicateKey as exc:
                raise DataError("a JSON object names this key twice", path=str(p), row=lineno, field=exc.key) from exc
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


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: an object naming a key twice is refused (``json`` keeps the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out

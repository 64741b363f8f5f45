"""Hostile configs and data files: each is refused with a named error, never a traceback, in bounded time.

The cases are data (:data:`CONFIG_CASES`, :data:`DATA_CASES`, :data:`HANDLED_CASES`) so that
``scripts/reliability.py`` runs the same corpus and classifies every outcome. A config case writes
a YAML file (or gives overrides) and expects :class:`~lorafed.errors.ConfigError`; a data case
writes a data file and expects :class:`~lorafed.errors.DataError` naming the file (and the row or
column where one is at fault). Every message is bounded in length, and the CLI turns each into
exit code 2 with no traceback.
"""

from __future__ import annotations

import io
import os
import random
import re
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from lorafed.cli import main
from lorafed.config import MAX_CONFIG_BYTES, DataConfig, load_config
from lorafed.data.clean import load_labeled
from lorafed.errors import ConfigError, DataError

#: No hostile case may take longer than this (seconds) or give a longer message (characters).
TIME_BOUND_S = 10.0
MESSAGE_BOUND = 4000


@dataclass(frozen=True)
class Case:
    """One hostile input.

    Attributes:
        name: Test id and report row.
        make: Writes the input into a folder and returns its path.
        match: Regular expression the error message must match.
        overrides: Config overrides (config cases) or ``DataConfig`` fields (data cases).
    """

    name: str
    make: Callable[[Path], Path]
    match: str
    overrides: dict[str, Any] | tuple[str, ...] = field(default_factory=dict)


def _text(name: str, body: str | bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        p = folder / name
        p.write_bytes(body.encode() if isinstance(body, str) else body)
        return p

    return make


def _bomb(levels: int, width: int) -> str:
    """A "billion laughs" YAML: each anchor lists ``width`` aliases of the one before."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _merge_bomb(levels: int) -> str:
    """Mappings merged into each other with ``<<``: the same expansion through merge keys."""
    lines = ["m0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8}"]
    for i in range(1, levels):
        merged = ", ".join(f"k{j}: *m{i - 1}" for j in range(8))
        lines.append(f"m{i}: &m{i} {{{merged}}}")
    return "\n".join(lines) + "\n"


def _zip(folder: Path, name: str) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("data.csv", "text,label\nhello,a\nworld,b\n")
    return _text(name, buf.getvalue())(folder)


def _parquet(folder: Path, name: str, frame: pd.DataFrame | None = None) -> Path:
    p = folder / name
    (frame if frame is not None else pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]})).to_parquet(p)
    return p


def _cut_parquet(folder: Path) -> Path:
    p = _parquet(folder, "cut.parquet")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _corrupt_parquet(folder: Path) -> Path:
    p = _parquet(folder, "corrupt.parquet")
    data = bytearray(p.read_bytes())
    data[4:-8] = bytes(random.Random(0).randrange(256) for _ in range(len(data) - 12))
    p.write_bytes(bytes(data))
    return p


def _dup_parquet(folder: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = folder / "dup.parquet"
    table = pa.table(
        [pa.array(["a", "b"]), pa.array(["c", "d"]), pa.array(["x", "y"])], names=["text", "text", "label"]
    )
    pq.write_table(table, p)
    return p


def _random_bytes(name: str, n: int, seed: int = 0) -> Callable[[Path], Path]:
    return _text(name, bytes(random.Random(seed).randrange(256) for _ in range(n)))


def _directory(folder: Path) -> Path:
    (p := folder / "dir.yaml").mkdir()
    return p


CSV_OK = "text,label\nhello,a\nworld,b\n"
BIG_FIELD = b"x" * 10_000_000

CONFIG_CASES: list[Case] = [
    Case(
        "yaml nested 33 deep (flow)",
        _text("c.yaml", "data:\n  labels: " + "[" * 33 + "]" * 33),
        "nested deeper than 32",
    ),
    Case("yaml nested 1000 deep", _text("c.yaml", "a: " + "[" * 1000 + "]" * 1000), "nested deeper than 32"),
    Case("yaml nested 100000 deep", _text("c.yaml", "a: " + "[" * 100_000 + "]" * 100_000), "nested deeper than 32"),
    Case(
        "yaml mappings nested 40 deep (block)",
        _text("c.yaml", "".join("  " * i + f"k{i}:\n" for i in range(40)) + "  " * 40 + "v: 1\n"),
        "nested deeper than 32",
    ),
    Case("yaml alias bomb 9x9 (billion laughs)", _text("c.yaml", _bomb(9, 9)), "more than 64 aliases"),
    Case("yaml alias bomb 30x2", _text("c.yaml", _bomb(30, 2)), "expands to more than 100000"),
    Case("yaml alias bomb under the alias count (5x10)", _text("c.yaml", _bomb(5, 10)), "expands to more than 100000"),
    Case("yaml merge-key bomb", _text("c.yaml", _merge_bomb(8)), "more than 64 aliases|expands to more than"),
    Case("yaml self-referencing alias", _text("c.yaml", "data: &a {x: *a}\n"), "alias refers to a collection"),
    Case("yaml self-referencing list", _text("c.yaml", "data:\n  labels: &a [a, *a]\n"), "alias refers to"),
    Case("non-UTF-8 byte (latin-1)", _text("c.yaml", "name: caf\xe9\n".encode("latin-1")), "not UTF-8 text.*line 1"),
    Case("non-UTF-8 byte on line 3", _text("c.yaml", b"seed: 0\nname: a\nx: \xff\xfe\n"), "byte 0xff at line 3"),
    Case("UTF-16 config", _text("c.yaml", "seed: 0\n".encode("utf-16")), "not UTF-8 text"),
    Case("NUL character", _text("c.yaml", "name: a\x00b\n"), "not valid YAML: unacceptable character #x0000"),
    Case("file over the size bound", _text("c.yaml", "#" * (MAX_CONFIG_BYTES + 1)), "larger than 1048576 bytes"),
    Case("8 MiB file", _text("c.yaml", ("# " + "x" * 1000 + "\n") * 8000), "larger than 1048576 bytes"),
    Case("document is a list", _text("c.yaml", "- a\n- b\n"), "top level must be a mapping, got list"),
    Case("document is a string", _text("c.yaml", "just text\n"), "top level must be a mapping, got str"),
    Case("document is an integer", _text("c.yaml", "42\n"), "top level must be a mapping, got int"),
    Case("two documents", _text("c.yaml", "seed: 0\n---\nseed: 1\n"), "not valid YAML: expected a single document"),
    Case("integer of 5000 digits", _text("c.yaml", "seed: " + "9" * 5000), "integer of 5000 digits"),
    Case("integer of 4000 digits", _text("c.yaml", "federation:\n  rounds: " + "9" * 4000), "integer of 4000 digits"),
    Case("negative integer of 4300 digits", _text("c.yaml", "seed: -" + "1" * 4300), "integer of 4300 digits"),
    Case("hex integer of 200 digits", _text("c.yaml", "seed: 0x" + "f" * 200), "integer of 20[12] digits"),
    Case("float 1e99999 (inf)", _text("c.yaml", "train:\n  learning_rate: 1e99999\n"), "expected a finite number"),
    Case("float .nan", _text("c.yaml", "train:\n  learning_rate: .nan\n"), "expected a finite number"),
    Case(
        "tag !!python/object/apply",
        _text("c.yaml", "name: !!python/object/apply:os.system [echo pwned]\n"),
        "tag 'tag:yaml.org,2002:python/object/apply:os.system' .* is not allowed",
    ),
    Case(
        "tag !!python/name", _text("c.yaml", "name: !!python/name:os.system\n"), "python/name:os.system' .*not allowed"
    ),
    Case("custom tag !foo", _text("c.yaml", "seed: !foo 1\n"), "tag '!foo' .*not allowed"),
    Case("key of 200000 characters", _text("c.yaml", "x" * 200_000 + ": 1\n"), "not valid YAML|unknown key"),
    Case(
        "5000 unknown keys",
        _text("c.yaml", "".join(f"k{i}: 1\n" for i in range(5000))),
        r"and 4981 more problem\(s\), 5001 in all",
    ),
    Case("a folder named .yaml", _directory, "not a regular file"),
    Case("missing file", lambda folder: folder / "missing.yaml", "config file not found"),
    Case(
        "override: integer of 5000 digits",
        _text("c.yaml", "seed: 0\n"),
        "override 'federation.rounds': an integer of 5000 digits",
        ("federation.rounds=" + "9" * 5000,),
    ),
    Case(
        "override: nested 5000 deep",
        _text("c.yaml", "seed: 0\n"),
        "override 'data.labels': nested deeper than 32",
        ("data.labels=" + "[" * 5000,),
    ),
    Case(
        "override: self-referencing alias",
        _text("c.yaml", "seed: 0\n"),
        "override 'data.labels': an alias refers to",
        ("data.labels=&a [*a]",),
    ),
]

DATA_CASES: list[Case] = [
    Case("CSV with a NUL byte", _text("d.csv", "text,label\nhello,a\nwo\x00rld,b\n"), r"d\.csv: NUL byte at line 3"),
    Case("CSV with a NUL byte in the header", _text("d.csv", "te\x00xt,label\nhello,a\n"), "NUL byte at line 1"),
    Case(
        "CSV with a 10 MB field (missing=error)",
        _text("d.csv", b"text,label\nhello,a\n" + BIG_FIELD + b",b\nworld,b\n"),
        r"d\.csv, row 2, column 'text': text over 100000 characters",
        {"missing": "error"},
    ),
    Case(
        "CSV with a 10 MB label (missing=error)",
        _text("d.csv", b"text,label\nhello,a\nworld," + BIG_FIELD + b"\n"),
        r"row 2, column 'label': label over 100000 characters",
        {"missing": "error"},
    ),
    Case("zip archive renamed .csv", lambda f: _zip(f, "d.csv"), r"d\.csv: this is a zip archive"),
    Case("xlsx-like zip renamed .jsonl", lambda f: _zip(f, "d.jsonl"), r"d\.jsonl: this is a zip archive"),
    Case("gzip file renamed .csv", _text("d.csv", b"\x1f\x8b\x08\x00" + bytes(64)), "this is a gzip file, not csv"),
    Case("Parquet file renamed .csv", lambda f: _parquet(f, "d.csv"), "this is a Parquet file, not csv text"),
    Case("pickle renamed .jsonl", _text("d.jsonl", b"\x80\x04\x95" + bytes(32)), "this is a Python pickle"),
    Case("random bytes as .parquet", _random_bytes("d.parquet", 5000), r"d\.parquet: not a Parquet file"),
    Case("CSV text as .parquet", _text("d.parquet", CSV_OK), "not a Parquet file"),
    Case("zip archive as .parquet", lambda f: _zip(f, "d.parquet"), "not a Parquet file .*it looks like a zip archive"),
    Case("truncated Parquet", _cut_parquet, "not a Parquet file"),
    Case("Parquet with a corrupted body", _corrupt_parquet, r"corrupt\.parquet: cannot read as parquet"),
    Case("random bytes as .csv", _random_bytes("d.csv", 5000), r"d\.csv: (NUL byte at line|not valid utf-8)"),
    Case(
        "random bytes as .jsonl",
        _random_bytes("d.jsonl", 5000, seed=1),
        "NUL byte at line|not valid utf-8|not valid JSON",
    ),
    Case("UTF-16 CSV read as UTF-8", _text("d.csv", CSV_OK.encode("utf-16")), "NUL byte at line 1.*UTF-16"),
    Case("empty .csv", _text("d.csv", b""), r"d\.csv: file is empty"),
    Case("empty .jsonl", _text("d.jsonl", b""), "file is empty"),
    Case("empty .parquet", _text("d.parquet", b""), "file is empty"),
    Case("header-only CSV", _text("d.csv", "text,label\n"), r"d\.csv: no rows left after filtering \(0 read"),
    Case("header-only TSV", _text("d.tsv", "text\tlabel\n"), r"no rows left after filtering \(0 read"),
    Case("header-only Parquet", lambda f: _parquet(f, "h.parquet", pd.DataFrame({"text": [], "label": []})), "0 read"),
    Case("JSONL of blank lines", _text("d.jsonl", "\n\n  \n"), "file has no records"),
    Case("CSV duplicate column", _text("d.csv", "text,text,label\na,b,x\nc,d,y\n"), "column 'text': the header names"),
    Case("TSV duplicate column", _text("d.tsv", "text\tlabel\tlabel\na\tx\ty\n"), "column 'label': the header names"),
    Case("Parquet duplicate column", _dup_parquet, "column 'text': the file has two columns"),
    Case(
        "JSONL duplicate key",
        _text("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "a", "label": "x", "label": "y"}\n'),
        r"row 2, column 'label': a JSON object names this key twice",
    ),
]


def run_config_case(case: Case, folder: Path) -> Any:
    """Load the case's config (and overrides); returns the config if it is (wrongly) accepted."""
    return load_config(case.make(folder), list(case.overrides))


def run_data_case(case: Case, folder: Path) -> Any:
    """Load the case's data file as a labelled table; returns the rows if they are (wrongly) accepted."""
    return load_labeled(DataConfig(path=str(case.make(folder)), **dict(case.overrides)), 0)


def _check(error: type, run: Callable[[Case, Path], Any], case: Case, folder: Path) -> str:
    t = time.perf_counter()
    with pytest.raises(error, match=case.match) as info:
        run(case, folder)
    assert time.perf_counter() - t < TIME_BOUND_S
    message = str(info.value)
    assert len(message) < MESSAGE_BOUND
    return message


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c.name for c in CONFIG_CASES])
def test_hostile_config_is_refused_by_name(case: Case, tmp_path: Path) -> None:
    message = _check(ConfigError, run_config_case, case, tmp_path)
    assert message.startswith(str(tmp_path))  # the file is named


@pytest.mark.parametrize("case", DATA_CASES, ids=[c.name for c in DATA_CASES])
def test_hostile_data_file_is_refused_by_name(case: Case, tmp_path: Path) -> None:
    message = _check(DataError, run_data_case, case, tmp_path)
    assert message.startswith(str(tmp_path))  # the file is named


def _big_field_dropped(folder: Path) -> tuple[bool, str]:
    """A 10 MB field under ``missing: drop`` is dropped and counted; the other rows are kept."""
    p = _text("d.csv", b"text,label\nhello,a\n" + BIG_FIELD + b",b\nworld,b\n")(folder)
    data = load_labeled(DataConfig(path=str(p)), 0)
    ok = data.texts == ["hello", "world"] and data.dropped == {"text over 100000 characters in 'text'": 1}
    return ok, f"kept {data.texts}, dropped {data.dropped}"


def _nul_in_utf16_read_as_utf16(folder: Path) -> tuple[bool, str]:
    """A UTF-16 CSV read with ``data.encoding: utf-16`` is not mistaken for a file with NUL bytes."""
    p = _text("d.csv", CSV_OK.encode("utf-16"))(folder)
    data = load_labeled(DataConfig(path=str(p), encoding="utf-16"), 0)
    return data.texts == ["hello", "world"], f"kept {data.texts}"


#: Hostile-looking inputs that are handled (not refused): each returns (as specified, what happened).
HANDLED_CASES: dict[str, Callable[[Path], tuple[bool, str]]] = {
    "CSV with a 10 MB field (missing=drop): dropped and counted": _big_field_dropped,
    "UTF-16 CSV with data.encoding=utf-16: read": _nul_in_utf16_read_as_utf16,
}


@pytest.mark.parametrize("name", list(HANDLED_CASES))
def test_handled_inputs(name: str, tmp_path: Path) -> None:
    ok, happened = HANDLED_CASES[name](tmp_path)
    assert ok, happened


# --- the CLI: exit code 2, a short message, no traceback -----------------------------------------------------


def _by_name(cases: list[Case], name: str) -> Case:
    return next(c for c in cases if c.name == name)


@pytest.mark.parametrize(
    "name",
    ["yaml nested 100000 deep", "yaml alias bomb 9x9 (billion laughs)", "non-UTF-8 byte (latin-1)",
     "integer of 5000 digits", "tag !!python/object/apply", "file over the size bound"],
)  # fmt: skip
def test_cli_config_show_exits_2(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = _by_name(CONFIG_CASES, name)
    assert main(["config", "show", "--config", str(case.make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    # ConfigError: one line naming the file, one bullet giving the reason.
    assert len(lines) == 2 and lines[0].startswith(f"lorafed config show: error: {tmp_path}"), err
    assert re.search(case.match, lines[1]), err


@pytest.mark.parametrize(
    "name", ["CSV with a NUL byte", "zip archive renamed .csv", "header-only CSV", "CSV duplicate column"]
)
def test_cli_partition_exits_2_on_hostile_data(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = _by_name(DATA_CASES, name)
    config = tmp_path / "c.yaml"
    config.write_text("partition: {scheme: iid, num_clients: 2}\n")
    assert main(["partition", "--config", str(config), f"data.path={case.make(tmp_path)}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"lorafed partition: error: {tmp_path}"), err


def test_config_bounds_leave_real_configs_alone() -> None:
    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "configs").glob("*.yaml")):
        load_config(path)
    assert os.path.getsize(root / "configs" / "clothing_recommend.yaml") < MAX_CONFIG_BYTES

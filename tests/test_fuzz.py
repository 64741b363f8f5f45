"""Fuzzing: arbitrary bytes into the data loader and the payload parser raise only documented errors."""

from __future__ import annotations

import contextlib
import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafed.config import DataConfig
from lorafed.data.clean import load_labeled
from lorafed.errors import DataError, PayloadError
from lorafed.wire.payload import PayloadMeta, payload_to_bytes
from lorafed.wire.reader import payload_from_bytes, read_meta

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_cells = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["a", "b", "", " ", '"', '""', "\n", ",", "\r\n", "NA", "nan", "1", "1.0", "\x00", "\ufeff"]),
)
_rows = st.lists(st.lists(_cells, min_size=0, max_size=4), min_size=0, max_size=8)


@st.composite
def csv_bytes(draw) -> bytes:
    """CSV-ish files: a plausible header, then mangled rows, in random encodings or raw bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    header = draw(st.sampled_from(["text,label", "text,label,shop", "label,text", "txt,label", "text"]))
    body = "\n".join(",".join(r) for r in draw(_rows))
    text = header + "\n" + body if draw(st.booleans()) else body
    enc = draw(st.sampled_from(["utf-8", "latin-1", "utf-16"]))
    return text.encode(enc, errors="replace")


_TMP = Path(tempfile.mkdtemp(prefix="lorafed-fuzz-"))


@FUZZ
@given(
    data=csv_bytes(),
    suffix=st.sampled_from([".csv", ".jsonl"]),
    opts=st.fixed_dictionaries(
        {
            "missing": st.sampled_from(["drop", "error"]),
            "bad_lines": st.sampled_from(["error", "skip"]),
            "labels": st.sampled_from([None, ("a", "b")]),
            "max_chars_per_field": st.sampled_from([5, 100_000]),
        }
    ),
)
def test_data_loader_raises_only_data_errors(data: bytes, suffix: str, opts: dict) -> None:
    path = _TMP / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        loaded = load_labeled(DataConfig(path=str(path), **opts), seed=0)
    except DataError:
        return
    # What loads is clean: non-empty texts within the bound, label ids inside the label list.
    assert len(loaded) > 0 and all(t and len(t) <= opts["max_chars_per_field"] for t in loaded.texts)
    assert loaded.labels.min() >= 0 and loaded.labels.max() < len(loaded.label_names)


def _valid_payload() -> bytes:
    tensors = {"x.lora_A.weight": torch.ones(2, 3), "x.lora_B.weight": torch.zeros(3, 2)}
    meta = PayloadMeta("sha256:00", {"r": 2}, ("a", "b"), 5, 1, "c0")
    return payload_to_bytes(tensors, meta)


VALID = _valid_payload()


@st.composite
def payload_bytes(draw) -> bytes:
    """Random bytes, mutated real payloads, and well-framed headers with hostile JSON."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:  # flip, cut or splice bytes of a valid payload
        data = bytearray(VALID)
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        cut = draw(st.integers(0, len(data)))
        return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
        max_leaves=8,
    )
    if kind == 2:  # a framed header holding arbitrary JSON, maybe where the metadata goes
        value = draw(json_values)
        where = draw(st.sampled_from(["top", "metadata", "lorafed"]))
        obj = value if where == "top" else {"__metadata__": value if where == "metadata" else {"lorafed": value}}
        body = json.dumps(obj).encode()
    else:  # a framed header with tensor entries and lorafed metadata of arbitrary shape
        meta = {k: draw(json_values) for k in draw(st.lists(st.sampled_from(list(PayloadMeta.__dataclass_fields__))))}
        meta["format_version"] = draw(st.sampled_from([1, 1, 2, "1"]))
        entry = {
            "dtype": draw(st.sampled_from(["F32", "F16", "I64", "BOOL", "XX"])),
            "shape": draw(st.lists(st.integers(-2, 2**40), max_size=3)),
            "data_offsets": draw(st.lists(st.integers(-2, 2**40), max_size=3)),
        }
        header = {"__metadata__": {"lorafed": json.dumps(meta)}, draw(st.text(max_size=5)): entry}
        body = json.dumps(header).encode()
    tail = draw(st.binary(max_size=64))
    return struct.pack("<Q", len(body)) + body + tail


@FUZZ
@given(data=payload_bytes())
def test_payload_parser_raises_only_payload_errors(data: bytes) -> None:
    path = _TMP / "fuzz.safetensors"
    path.write_bytes(data)
    with contextlib.suppress(PayloadError):  # the header-only reader the server uses to sort a round's files
        read_meta(path)
    try:
        payload = payload_from_bytes(data)
    except PayloadError:
        return
    assert isinstance(payload.meta.num_examples, int) and all(
        isinstance(t, torch.Tensor) for t in payload.tensors.values()
    )

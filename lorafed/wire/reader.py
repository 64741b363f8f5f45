"""Reading payload bytes from parties the server does not control: bounded, zero-copy, never unpickling.

Every check here runs before anything is trusted: the container (pickle and zip archives are
recognised by their first bytes and refused unread), the header size, JSON depth and integer
sizes, the lorafed metadata fields, and the tensor entries (dtype, shape, offsets tiling the data
exactly). Tensors are views into the bytes read. Writing lives in :mod:`lorafed.wire.payload`.

Why one module over 300 lines: it is the parser of hostile bytes; splitting the bounds
from the parse would let a check be skipped by a caller that imports only half.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafed.errors import PayloadError
from lorafed.wire.payload import FORMAT_VERSION, MAX_BLOCK_SIZE, MAX_HEADER_BYTES, META_KEY, Payload, PayloadMeta

#: Deepest JSON nesting accepted in a header (a real one nests 3 levels; Python's parser would
#: raise RecursionError on thousands, and deep objects break every later repr or comparison).
MAX_JSON_DEPTH = 16
#: Most dimensions of a tensor, and largest size of one dimension (torch needs int64 sizes).
MAX_NDIM = 8
MAX_DIM = 1 << 40
#: safetensors dtype codes read back (any other code is refused as corrupted).
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class PayloadHeader:
    """A payload's parsed header, as :func:`read_header` found it.

    Attributes:
        raw: The header bytes (length prefix included), to recognise the same header later.
        fields: The parsed safetensors header (tensor entries and ``__metadata__``).
        meta: The lorafed metadata.
    """

    raw: bytes
    fields: dict[str, Any]
    meta: PayloadMeta


def load_payload(
    path: str | Path,
    max_bytes: int | None = None,
    max_header_bytes: int = MAX_HEADER_BYTES,
    header: PayloadHeader | None = None,
) -> Payload:
    """Read and parse a payload file.

    Args:
        path: The ``.safetensors`` file.
        max_bytes: Refuse files larger than this.
        max_header_bytes: Refuse a safetensors header larger than this, before parsing it.
        header: This file's header from an earlier :func:`read_header`; when the file still
            starts with the same bytes it is not parsed again (the server reads every header
            first, to find duplicate clients, then each file once).

    Raises:
        PayloadError: Missing, truncated, not safetensors (pickle, zip), oversized or corrupted
            header, or a lorafed header that is missing or malformed.
    """
    p = Path(path)
    if not p.is_file():
        raise PayloadError("payload file not found", path=str(p))
    size = p.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise PayloadError(f"file is {size} bytes, above the limit of {max_bytes}", path=str(p))
    data = bytearray(size)
    with open(p, "rb") as fh:
        got = fh.readinto(data)
    if got != size:
        data = data[:got]
    if header is not None and data[: len(header.raw)] == header.raw:
        return Payload(_tensors_from_buffer(header.fields, data, len(header.raw), str(p)), header.meta, len(data))
    return payload_from_bytes(data, source=str(p), max_header_bytes=max_header_bytes)


def payload_from_bytes(
    data: bytes | bytearray, source: str = "<bytes>", max_header_bytes: int = MAX_HEADER_BYTES
) -> Payload:
    """Parse payload bytes (see :func:`load_payload`).

    The tensors are zero-copy views into ``data`` (copied once into a ``bytearray`` if it is
    read-only ``bytes``): one read of the file and one parse of its header per payload.
    """
    header = _check_container(data, source, max_header_bytes)
    meta = _parse_meta(_meta_string(header, source), source)
    buf = data if isinstance(data, bytearray) else bytearray(data)
    tensors = _tensors_from_buffer(header, buf, 8 + struct.unpack("<Q", data[:8])[0], source)
    return Payload(tensors, meta, len(data))


def _meta_string(header: dict[str, Any], source: str) -> str:
    """The lorafed JSON string in a safetensors header's ``__metadata__``."""
    extra = header.get("__metadata__")
    meta_raw = extra.get(META_KEY) if isinstance(extra, dict) else None
    if meta_raw is None:
        raise PayloadError("a safetensors file, but not a lorafed payload (no 'lorafed' metadata)", path=source)
    if not isinstance(meta_raw, str):
        raise PayloadError(f"lorafed metadata: expected a JSON string, got {type(meta_raw).__name__}", path=source)
    return meta_raw


def _tensors_from_buffer(header: dict[str, Any], buf: bytearray, start: int, source: str) -> dict[str, torch.Tensor]:
    """Tensors described by a safetensors header, as views into ``buf``; the data must be tiled exactly.

    Raises:
        PayloadError: Unknown dtype, bad shape or offsets, tensors that overlap, leave gaps or
            do not end where the file ends.
    """
    body = len(buf) - start
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise PayloadError(
                f"corrupted safetensors header: tensor {_short(name)}: {_short(exc, 120)}", path=source
            ) from exc
        if (
            len(shape) > MAX_NDIM
            or any(type(d) is not int or not 0 <= d <= MAX_DIM for d in shape)
            or type(begin) is not int
            or type(end) is not int
        ):
            raise PayloadError(
                f"corrupted safetensors header: tensor {_short(name)}: bad shape or offsets "
                f"(shape {_short(entry.get('shape'))}, data_offsets {_short(entry.get('data_offsets'))}; "
                f"at most {MAX_NDIM} dimensions of at most {MAX_DIM})",
                path=source,
            )
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if not 0 <= begin <= end <= body or end - begin != nbytes:
            raise PayloadError(
                f"corrupted safetensors data: tensor {_short(name)} of shape {_short(shape)} ({_short(nbytes)} bytes) "
                f"claims bytes [{_short(begin)}, {_short(end)}) of a {body}-byte data section",
                path=source,
            )
        spans.append((begin, end, name))
        if numel:
            tensors[name] = torch.frombuffer(buf, dtype=dtype, count=numel, offset=start + begin).view(shape)
        else:
            tensors[name] = torch.empty(shape, dtype=dtype)
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise PayloadError(
                f"corrupted safetensors data: tensor {name!r} starts at {begin}, expected {pos}", path=source
            )
        pos = end
    if pos != body:
        raise PayloadError(f"corrupted safetensors data: {body - pos} bytes after the last tensor", path=source)
    return tensors


def _check_container(data: bytes | bytearray, source: str, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """Recognise non-safetensors files by their first bytes, before anything is parsed; return the header.

    A safetensors file is recognised first (a header length that fits the file, then ``{``): its
    length's first two bytes can look like a pickle's start (a 640-byte header is ``80 02 ...``),
    and an honest update must not be refused as one.
    """
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else None
    looks_safetensors = n is not None and n <= max_header_bytes and 8 + n <= len(data) and data[8:9] == b"{"
    if not looks_safetensors and data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        raise PayloadError("this is a Python pickle, not safetensors; refused without loading it", path=source)
    if data[:4] == b"PK\x03\x04":
        raise PayloadError(
            "this is a zip archive (torch.save format), not safetensors; refused without loading it", path=source
        )
    if n is None:
        raise PayloadError(f"truncated: {len(data)} bytes, not even a safetensors header length", path=source)
    if n > max_header_bytes:
        raise PayloadError(f"header of {n} bytes exceeds the bound of {max_header_bytes}", path=source)
    if 8 + n > len(data):
        raise PayloadError(f"truncated: header says {n} bytes but the file has {len(data) - 8}", path=source)
    header = _loads_bounded(bytes(data[8 : 8 + n]), "corrupted header", source)
    if not isinstance(header, dict):
        raise PayloadError("corrupted header: not a JSON object", path=source)
    return header


def _loads_bounded(raw: str | bytes, what: str, source: str) -> Any:
    """``json.loads`` that turns every way hostile JSON can fail into a :class:`PayloadError`.

    Refused: invalid UTF-8 or JSON, nesting deeper than :data:`MAX_JSON_DEPTH` (also when it is so
    deep that the parser itself raises ``RecursionError``) and integers of more digits than
    Python converts (``ValueError`` from ``sys.int_info.str_digits_check_threshold``).
    """
    try:
        obj = json.loads(raw)
    except RecursionError as exc:
        raise PayloadError(f"{what}: JSON nested too deep (more than {MAX_JSON_DEPTH} levels)", path=source) from exc
    except UnicodeDecodeError as exc:
        raise PayloadError(f"{what}: not UTF-8 JSON ({exc.reason} at byte {exc.start})", path=source) from exc
    except json.JSONDecodeError as exc:
        raise PayloadError(f"{what}: not JSON ({exc})", path=source) from exc
    except ValueError as exc:  # e.g. an integer literal of thousands of digits
        raise PayloadError(f"{what}: unreadable JSON value ({str(exc)[:120]})", path=source) from exc
    depth = _json_depth(obj)
    if depth > MAX_JSON_DEPTH:
        raise PayloadError(f"{what}: JSON nested {depth} levels deep, above the bound of {MAX_JSON_DEPTH}", path=source)
    return obj


def _json_depth(obj: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``[]`` is 1), without recursion; stops past the bound."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        stack.extend((child, depth) for child in children)
    return deepest


def _parse_meta(raw: str, source: str) -> PayloadMeta:
    """The lorafed header from its JSON string, every field type-checked.

    Raises:
        PayloadError: Not JSON, nested too deep, a number too long to read, a missing or
            mistyped field, or a ``block_size`` outside [1, :data:`MAX_BLOCK_SIZE`].
    """
    obj = _loads_bounded(raw, "lorafed metadata", source)
    if not isinstance(obj, dict):
        raise PayloadError("lorafed metadata is not a JSON object", path=source)
    version = obj.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise PayloadError(f"format_version: expected {FORMAT_VERSION}, got {_short(version)}", path=source)
    checks: dict[str, type | tuple[type, ...]] = {
        "base_fingerprint": str,
        "lora": dict,
        "labels": list,
        "num_examples": int,
        "round": int,
        "client_id": str,
        "dtype": str,
        "kind": str,
    }
    for name, tp in checks.items():
        value = obj.get(name)
        if not isinstance(value, tp) or isinstance(value, bool):
            raise PayloadError(
                f"metadata field {name}: expected {getattr(tp, '__name__', tp)}, got {_short(value)}", path=source
            )
    if not all(isinstance(x, str) for x in obj["labels"]):
        raise PayloadError("metadata field labels: expected a list of strings", path=source)
    if not isinstance(obj.get("metrics") or {}, dict):
        raise PayloadError(f"metadata field metrics: expected an object, got {_short(obj['metrics'])}", path=source)
    block_size = obj.get("block_size")
    if obj["dtype"] == "int8_block" and (
        not isinstance(block_size, int) or isinstance(block_size, bool) or not 1 <= block_size <= MAX_BLOCK_SIZE
    ):
        raise PayloadError(
            f"metadata field block_size: expected an integer >= 1, got {_short(block_size)} "
            f"(and at most {MAX_BLOCK_SIZE})",
            path=source,
        )
    return PayloadMeta(
        base_fingerprint=obj["base_fingerprint"],
        lora=obj["lora"],
        labels=tuple(obj["labels"]),
        num_examples=obj["num_examples"],
        round=obj["round"],
        client_id=obj["client_id"],
        dtype=obj["dtype"],
        kind=obj["kind"],
        metrics=obj.get("metrics") or {},
        format_version=version,
        block_size=block_size if obj["dtype"] == "int8_block" else None,
    )


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a hostile value may be megabytes long)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def header_from_bytes(
    data: bytes | bytearray, source: str = "<bytes>", max_header_bytes: int = MAX_HEADER_BYTES
) -> PayloadHeader:
    """Parse only the header of payload bytes (see :func:`read_header`).

    Raises:
        PayloadError: As :func:`load_payload`, for the header part.
    """
    header = _check_container(data, source, max_header_bytes)
    n = 8 + struct.unpack("<Q", data[:8])[0]
    return PayloadHeader(bytes(data[:n]), header, _parse_meta(_meta_string(header, source), source))


def payload_with_header(data: bytes | bytearray, header: PayloadHeader, source: str = "<bytes>") -> Payload:
    """Parse payload bytes whose header was already read by :func:`header_from_bytes` (parsed once)."""
    if data[: len(header.raw)] != header.raw:
        return payload_from_bytes(data, source)
    buf = data if isinstance(data, bytearray) else bytearray(data)
    return Payload(_tensors_from_buffer(header.fields, buf, len(header.raw), source), header.meta, len(data))


def read_meta(path: str | Path, max_header_bytes: int = MAX_HEADER_BYTES) -> PayloadMeta:
    """Read only a payload's header (no tensors), e.g. to sort a round's files before loading them.

    Raises:
        PayloadError: As :func:`load_payload`, for the header part.
    """
    return read_header(path, max_header_bytes).meta


def read_header(path: str | Path, max_header_bytes: int = MAX_HEADER_BYTES) -> PayloadHeader:
    """Read and parse only a payload's header (see :func:`read_meta`).

    Raises:
        PayloadError: As :func:`load_payload`, for the header part.
    """
    p = Path(path)
    if not p.is_file():
        raise PayloadError("payload file not found", path=str(p))
    with open(p, "rb") as fh:
        head = fh.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            head += fh.read(min(n, max_header_bytes + 1))
    header = _check_container(head, str(p), max_header_bytes)
    return PayloadHeader(bytes(head), header, _parse_meta(_meta_string(header, str(p)), str(p)))

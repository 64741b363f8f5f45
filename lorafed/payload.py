"""Payload files: adapter tensors in one ``.safetensors`` file with a lorafed metadata header.

The header (under the safetensors metadata key ``lorafed``, as JSON) holds the format
version, the base-model fingerprint, the LoRA config, the label list, ``num_examples``, the
round, the client id and the tensor dtype. Reading never unpickles anything: a pickle or
``torch.save`` archive renamed ``.safetensors`` is recognised by its first bytes and refused.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lorafed.errors import PayloadError
from lorafed.io import atomic_write_bytes

FORMAT_VERSION = 1
#: Refuse headers above this size before parsing them (a real header is a few KB).
MAX_HEADER_BYTES = 1 << 20
_META_KEY = "lorafed"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PayloadMeta:
    """What a payload says about itself.

    Attributes:
        base_fingerprint: :func:`lorafed.model.base_fingerprint` of the base it was trained on.
        lora: LoRA config (r, alpha, dropout, target_modules).
        labels: The global label list, in id order.
        num_examples: Training examples behind this update (the FedAvg weight n_i).
        round: The round this update belongs to (for a global adapter: rounds completed).
        client_id: Who produced it (``server`` for global adapters).
        dtype: Transport dtype of the tensors.
        kind: ``update`` (from a client) or ``global`` (from the server).
        metrics: Optional training metrics (loss, steps...).
        format_version: The payload format version.
    """

    base_fingerprint: str
    lora: dict[str, Any]
    labels: tuple[str, ...]
    num_examples: int
    round: int
    client_id: str
    dtype: str = "float32"
    kind: str = "update"
    metrics: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION


@dataclass(frozen=True)
class Payload:
    """Adapter tensors with their header."""

    tensors: dict[str, torch.Tensor]
    meta: PayloadMeta


def payload_to_bytes(tensors: Mapping[str, torch.Tensor], meta: PayloadMeta) -> bytes:
    """Serialize to safetensors bytes, casting tensors to ``meta.dtype``."""
    dtype = _DTYPES.get(meta.dtype)
    if dtype is None:
        raise PayloadError(f"unsupported transport dtype {meta.dtype!r}; expected one of {sorted(_DTYPES)}")
    header = asdict(meta)
    header["labels"] = list(meta.labels)
    data = {k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}
    return st_save(data, metadata={_META_KEY: json.dumps(header, sort_keys=True)})


def save_payload(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: PayloadMeta) -> Path:
    """Write a payload file atomically (temporary file, then rename)."""
    return atomic_write_bytes(path, payload_to_bytes(tensors, meta))


def load_payload(path: str | Path, max_bytes: int | None = None, max_header_bytes: int = MAX_HEADER_BYTES) -> Payload:
    """Read and parse a payload file.

    Args:
        path: The ``.safetensors`` file.
        max_bytes: Refuse files larger than this.
        max_header_bytes: Refuse a safetensors header larger than this, before parsing it.

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
    return payload_from_bytes(p.read_bytes(), source=str(p), max_header_bytes=max_header_bytes)


def payload_from_bytes(data: bytes, source: str = "<bytes>", max_header_bytes: int = MAX_HEADER_BYTES) -> Payload:
    """Parse payload bytes (see :func:`load_payload`)."""
    header = _check_container(data, source, max_header_bytes)
    meta = _parse_meta(_meta_string(header, source), source)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError) as exc:
        raise PayloadError(f"corrupted safetensors data: {exc}", path=source) from exc
    return Payload(tensors, meta)


def _meta_string(header: dict[str, Any], source: str) -> str:
    """The lorafed JSON string in a safetensors header's ``__metadata__``."""
    extra = header.get("__metadata__")
    meta_raw = extra.get(_META_KEY) if isinstance(extra, dict) else None
    if meta_raw is None:
        raise PayloadError("a safetensors file, but not a lorafed payload (no 'lorafed' metadata)", path=source)
    if not isinstance(meta_raw, str):
        raise PayloadError(f"lorafed metadata: expected a JSON string, got {type(meta_raw).__name__}", path=source)
    return meta_raw


def _check_container(data: bytes, source: str, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """Recognise non-safetensors files by their first bytes, before anything is parsed; return the header."""
    if data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        raise PayloadError("this is a Python pickle, not safetensors; refused without loading it", path=source)
    if data[:4] == b"PK\x03\x04":
        raise PayloadError(
            "this is a zip archive (torch.save format), not safetensors; refused without loading it", path=source
        )
    if len(data) < 8:
        raise PayloadError(f"truncated: {len(data)} bytes, not even a safetensors header length", path=source)
    (n,) = struct.unpack("<Q", data[:8])
    if n > max_header_bytes:
        raise PayloadError(f"header of {n} bytes exceeds the bound of {max_header_bytes}", path=source)
    if 8 + n > len(data):
        raise PayloadError(f"truncated: header says {n} bytes but the file has {len(data) - 8}", path=source)
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"corrupted header: not JSON ({exc})", path=source) from exc
    if not isinstance(header, dict):
        raise PayloadError("corrupted header: not a JSON object", path=source)
    return header


def _parse_meta(raw: str, source: str) -> PayloadMeta:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PayloadError(f"lorafed metadata is not JSON: {exc}", path=source) from exc
    if not isinstance(obj, dict):
        raise PayloadError("lorafed metadata is not a JSON object", path=source)
    version = obj.get("format_version")
    if version != FORMAT_VERSION:
        raise PayloadError(f"format_version: expected {FORMAT_VERSION}, got {version!r}", path=source)
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
                f"metadata field {name}: expected {getattr(tp, '__name__', tp)}, got {value!r}", path=source
            )
    if not all(isinstance(x, str) for x in obj["labels"]):
        raise PayloadError("metadata field labels: expected a list of strings", path=source)
    if not isinstance(obj.get("metrics") or {}, dict):
        raise PayloadError(f"metadata field metrics: expected an object, got {obj['metrics']!r}", path=source)
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
    )


def read_meta(path: str | Path, max_header_bytes: int = MAX_HEADER_BYTES) -> PayloadMeta:
    """Read only a payload's header (no tensors), e.g. to sort a round's files before loading them.

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
    return _parse_meta(_meta_string(header, str(p)), str(p))

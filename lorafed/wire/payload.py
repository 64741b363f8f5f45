"""Payload files: adapter tensors in one ``.safetensors`` file with a lorafed metadata header.

The header (under the safetensors metadata key ``lorafed``, as JSON) holds the format
version, the base-model fingerprint, the LoRA config, the label list, ``num_examples``, the
round, the client id and the transport encoding (``dtype``: float32, float16, bfloat16, int8 or
int8_block, see :mod:`lorafed.wire.compress`). Writing encodes fp32 tensors; reading returns the wire
tensors as sent, so validation checks what travelled, and :meth:`Payload.decoded` gives fp32.
Reading never unpickles anything: a pickle or ``torch.save`` archive renamed ``.safetensors``
is recognised by its first bytes and refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from lorafed.errors import PayloadError
from lorafed.files import atomic_write_bytes
from lorafed.wire.compress import TRANSPORTS, decode, encode

FORMAT_VERSION = 1
#: Refuse headers above this size before parsing them (a real header is a few KB).
#: The client ids lorafed writes (headers, file names, key registries): 1-128 letters, digits, ``_``, ``.``, ``-``.
CLIENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
MAX_HEADER_BYTES = 1 << 20
META_KEY = "lorafed"
#: Largest ``block_size`` a header may state (the server bounds it further by its tensors).
MAX_BLOCK_SIZE = 1 << 31


@dataclass(frozen=True)
class PayloadMeta:
    """What a payload says about itself.

    Attributes:
        base_fingerprint: :func:`lorafed.model.backbone.base_fingerprint` of the base it was trained on.
        lora: LoRA config (r, alpha, dropout, target_modules).
        labels: The global label list, in id order.
        num_examples: Training examples behind this update (the FedAvg weight n_i).
        round: The round this update belongs to (for a global adapter: rounds completed).
        client_id: Who produced it (``server`` for global adapters).
        dtype: Transport encoding of the tensors (one of :data:`lorafed.wire.compress.TRANSPORTS`).
        kind: ``update`` (from a client) or ``global`` (from the server).
        metrics: Optional training metrics (loss, steps...).
        format_version: The payload format version.
        block_size: Elements per scale when ``dtype`` is ``int8_block`` (else ``None``).
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
    block_size: int | None = None


@dataclass(frozen=True)
class ModelIdentity:
    """What every payload of one federation shares: the base, the LoRA config and the labels.

    The one place payload headers are built (:meth:`meta`), by clients and the server alike.
    """

    base_fingerprint: str
    lora: dict[str, Any]
    labels: tuple[str, ...]

    def meta(
        self,
        client_id: str,
        round_: int,
        num_examples: int,
        kind: str = "update",
        metrics: dict[str, Any] | None = None,
        dtype: str = "float32",
        block_size: int | None = None,
    ) -> PayloadMeta:
        """A header for a payload of this federation (a ``global`` one is always float32)."""
        return PayloadMeta(
            base_fingerprint=self.base_fingerprint,
            lora=dict(self.lora),
            labels=tuple(self.labels),
            num_examples=num_examples,
            round=round_,
            client_id=client_id,
            kind=kind,
            metrics=dict(metrics or {}),
            dtype=dtype if kind == "update" else "float32",
            block_size=block_size if kind == "update" else None,
        )

    @classmethod
    def of(cls, meta: PayloadMeta) -> ModelIdentity:
        """The identity a payload header names."""
        return cls(meta.base_fingerprint, dict(meta.lora), tuple(meta.labels))


@dataclass(frozen=True)
class Payload:
    """Adapter tensors as they travelled (wire encoding), with their header.

    Attributes:
        tensors: Name -> wire tensor.
        meta: The lorafed header.
        nbytes: Size of the serialized payload (0 when it was not read from bytes).
    """

    tensors: dict[str, torch.Tensor]
    meta: PayloadMeta
    nbytes: int = 0

    def decoded(self) -> dict[str, torch.Tensor]:
        """The adapter tensors in fp32 (validate the payload first: decoding trusts its scales)."""
        return decode(self.tensors, self.meta.dtype, self.meta.block_size or 0)


def payload_to_bytes(tensors: Mapping[str, torch.Tensor], meta: PayloadMeta) -> bytes:
    """Serialize to safetensors bytes, encoding the (fp32) tensors as ``meta.dtype`` says.

    Raises:
        PayloadError: Unknown transport, or ``int8_block`` without a ``block_size`` >= 1.
    """
    if meta.dtype not in TRANSPORTS:
        raise PayloadError(f"unsupported transport dtype {meta.dtype!r}; expected one of {list(TRANSPORTS)}")
    if meta.dtype == "int8_block" and (meta.block_size is None or meta.block_size < 1):
        raise PayloadError(f"transport int8_block needs block_size >= 1, got {meta.block_size!r}")
    header = asdict(meta)
    header["labels"] = list(meta.labels)
    if meta.dtype != "int8_block":
        del header["block_size"]  # float and per-tensor payloads keep the original header fields
    data = encode(tensors, meta.dtype, meta.block_size or 0)
    return st_save(data, metadata={META_KEY: json.dumps(header, sort_keys=True)})


def payload_digest(data: bytes | bytearray) -> str:
    """A payload's fingerprint: the sha256 of its bytes (hex), as global adapters name their parent."""
    return hashlib.sha256(data).hexdigest()


def save_payload(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: PayloadMeta) -> Path:
    """Write a payload file atomically (temporary file, then rename)."""
    return atomic_write_bytes(path, payload_to_bytes(tensors, meta))

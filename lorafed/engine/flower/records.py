"""Payload bytes <-> Flower records."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Message

from lorafed.errors import PayloadError

#: The single array in an ArrayRecord that carries a lorafed payload.
PAYLOAD_KEY = "payload"
STYPE = "safetensors"


def payload_record(data: bytes) -> ArrayRecord:
    """Wrap payload bytes as a one-array ``ArrayRecord`` (Flower chunks it in transit)."""
    return ArrayRecord({PAYLOAD_KEY: Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)})


def record_bytes(message: Message, record: str) -> bytes:
    """The payload bytes in ``message.content[record]``.

    Raises:
        PayloadError: The record or its payload array is missing or of another kind.
    """
    src = f"message from node {message.metadata.src_node_id}"
    if record not in message.content.array_records:
        raise PayloadError(f"no array record {record!r} (has {sorted(message.content.keys())})", path=src)
    rec = message.content.array_records[record]
    if PAYLOAD_KEY not in rec or rec[PAYLOAD_KEY].stype != STYPE:
        raise PayloadError(f"record {record!r} holds no {STYPE} array {PAYLOAD_KEY!r}", path=src)
    return bytes(rec[PAYLOAD_KEY].data)

"""Seeds by client id: the same client draws the same split and the same batches in every engine."""

from __future__ import annotations

import zlib


def _id_hash(client_id: str) -> int:
    """A stable 32-bit hash of a client id (crc32: the same in every process and Python version)."""
    return zlib.crc32(str(client_id).encode("utf-8"))


def client_seed(seed: int, round_: int, client_id: str) -> int:
    """A distinct, reproducible seed for one client's round.

    It depends on the client's id, not its position in the partition, so a client training
    alone in its own process (``lorafed client train``, a Flower node, a file-drop poller) draws
    exactly what the simulator draws for the same id.
    """
    return (seed * 1_000_003 + round_ * 10_007 + _id_hash(client_id)) % (2**31 - 1)


def split_seed(seed: int, client_id: str) -> int:
    """The seed of a client's train/validation/test split (by client id, see :func:`client_seed`)."""
    return (seed + 7919 * (_id_hash(client_id) + 1)) % (2**31 - 1)

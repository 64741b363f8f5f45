"""Validation of updates before aggregation: nothing invalid is ever averaged.

:func:`validate_update` checks one payload against what the federation expects and raises
:class:`~lorafed.errors.PayloadValidationError` naming the client, the field or tensor, what was
expected and what was received. It does no I/O; :mod:`lorafed.server` applies it to each file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lorafed.errors import PayloadValidationError
from lorafed.payload import Payload

#: A single client claiming more examples than this is refused as absurd.
MAX_NUM_EXAMPLES = 10**9


@dataclass(frozen=True)
class UpdateSpec:
    """What every update of a round must match.

    Attributes:
        base_fingerprint: Fingerprint of the federation's base model.
        lora: The LoRA config dict.
        labels: The global label list.
        tensors: Name -> (shape, dtype) of every tensor an update must carry, no more, no less.
        round: The round updates must belong to (``None``: any).
        max_num_examples: Upper bound on ``num_examples``.
    """

    base_fingerprint: str
    lora: Mapping[str, Any]
    labels: tuple[str, ...]
    tensors: Mapping[str, tuple[tuple[int, ...], str]]
    round: int | None = None
    max_num_examples: int = MAX_NUM_EXAMPLES


def validate_update(payload: Payload, spec: UpdateSpec, source: str = "") -> None:
    """Check one update against ``spec``.

    Raises:
        PayloadValidationError: At the first problem, naming client, field and both values.
    """
    m = payload.meta
    cid = m.client_id

    def fail(what: str, expected: object, received: object) -> None:
        raise PayloadValidationError(cid, what, expected, received, source)

    if m.base_fingerprint != spec.base_fingerprint:
        fail(
            "base_fingerprint",
            spec.base_fingerprint[:23] + "...",
            m.base_fingerprint[:23] + "... (trained on another base model)",
        )
    if dict(m.lora) != dict(spec.lora):
        keys = sorted(set(m.lora) | set(spec.lora), key=str)
        diff = [k for k in keys if m.lora.get(k, "<absent>") != spec.lora.get(k, "<absent>")]
        fail(
            f"lora config {', '.join(map(str, diff))}",
            {k: spec.lora.get(k, "<absent>") for k in diff},
            {k: m.lora.get(k, "<absent>") for k in diff},
        )
    if tuple(m.labels) != tuple(spec.labels):
        fail("labels", list(spec.labels), list(m.labels))
    if spec.round is not None and m.round != spec.round:
        fail("round", spec.round, m.round)
    if m.num_examples <= 0 or m.num_examples > spec.max_num_examples:
        fail("num_examples", f"an integer in [1, {spec.max_num_examples}]", m.num_examples)
    missing = sorted(set(spec.tensors) - set(payload.tensors))
    extra = sorted(set(payload.tensors) - set(spec.tensors))
    if missing:
        fail(f"tensor {missing[0]}", "present", f"missing ({len(missing)} tensors missing)")
    if extra:
        fail(f"tensor {extra[0]}", "absent (not part of the adapter)", f"present ({len(extra)} unknown tensors)")
    for name, (shape, _dtype) in spec.tensors.items():
        t = payload.tensors[name]
        if tuple(t.shape) != tuple(shape):
            fail(f"tensor {name} shape", tuple(shape), tuple(t.shape))
        got = str(t.dtype).removeprefix("torch.")
        if got != m.dtype:
            fail(f"tensor {name} dtype", m.dtype, got)
        if not t.dtype.is_floating_point:
            fail(f"tensor {name} dtype", "a floating-point dtype", got)
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            fail(f"tensor {name} values", "finite", f"{bad} NaN/Inf values")

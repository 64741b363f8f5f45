"""Combining several adapters into one payload, with weights (``lorafed combine``).

("Combine" here; "merge" in lorafed means only folding an adapter into the base weights at export.)
The math is in :mod:`lorafed.wire.factors`: ``fedavg`` (tensor FedAvg, not the mean of the deltas),
``cat`` (exact rank concatenation) and ``svd`` (exact up to truncation, with its error reported).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafed.wire.factors import LoraFactors, MergeError, MergeMode, MergeResult, merge_adapters, normalise_weights
from lorafed.wire.payload import Payload, PayloadMeta


def combine_payloads(
    payloads: Sequence[Payload],
    sources: Sequence[str],
    mode: MergeMode,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
) -> tuple[dict[str, torch.Tensor], PayloadMeta, MergeResult]:
    """Merge lorafed payloads (global or client adapters) and build the merged adapter's header.

    Args:
        payloads: The adapters, already loaded.
        sources: Their file names, for messages and the header.
        mode: See :func:`merge_adapters`.
        weights: One weight per adapter; default: each header's ``num_examples``.
        rank: Target rank for ``svd``.

    Returns:
        The merged tensors, their header (LoRA ``r``/``alpha`` of the merged factors) and the result.

    Raises:
        MergeError: Different base fingerprints, labels or target modules, or any error of
            :func:`merge_adapters`.
    """
    if not payloads:
        raise MergeError("no adapters to merge")
    first = payloads[0].meta
    for p, src in zip(payloads, sources, strict=True):
        m = p.meta
        for name, got, want in (
            ("base_fingerprint", m.base_fingerprint, first.base_fingerprint),
            ("labels", list(m.labels), list(first.labels)),
            (
                "lora target_modules",
                sorted(m.lora.get("target_modules", [])),
                sorted(first.lora.get("target_modules", [])),
            ),
        ):
            if got != want:
                raise MergeError(f"{src}: {name} {got} differs from {sources[0]}'s {want}")
    ws = list(weights) if weights is not None else [float(p.meta.num_examples) for p in payloads]
    adapters = []
    for p, src in zip(payloads, sources, strict=True):
        r, alpha = p.meta.lora.get("r"), p.meta.lora.get("alpha")
        if not isinstance(r, int) or not isinstance(alpha, (int, float)):
            raise MergeError(f"{src}: header lora needs integer r and numeric alpha, got r={r!r}, alpha={alpha!r}")
        adapters.append(LoraFactors(p.decoded(), r, float(alpha)))
    result = merge_adapters(adapters, ws, mode, rank)
    lora = dict(first.lora)
    lora["r"] = result.r
    lora["alpha"] = int(result.alpha) if float(result.alpha).is_integer() else result.alpha
    metrics: dict[str, object] = {
        "merge_mode": mode,
        "sources": list(sources),
        "weights": normalise_weights(ws),
    }
    if result.truncation:
        metrics["svd_relative_error_max"] = max(result.truncation.values())
        metrics["svd_relative_error"] = result.truncation
    meta = PayloadMeta(
        base_fingerprint=first.base_fingerprint,
        lora=lora,
        labels=tuple(first.labels),
        num_examples=sum(p.meta.num_examples for p in payloads),
        round=max(p.meta.round for p in payloads),
        client_id="merge",
        kind="merged",
        metrics=metrics,
    )
    return result.tensors, meta, result

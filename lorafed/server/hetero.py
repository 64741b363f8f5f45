"""Heterogeneous LoRA ranks: clients with r = 4, 8, 16 in one federation, aggregated exactly.

Averaging factors of different ranks is undefined (and for equal ranks inexact, see
:mod:`lorafed.wire.roles`). The exact aggregate is the weighted mean of each client's dense
change ``delta_i = (alpha_i / r_i) B_i A_i`` per adapted weight (FlexLoRA, Bai et al. 2024):

    delta = sum_i w_i delta_i,  w_i = n_i / n

which the server then truncates back to the global rank by SVD (``U_k S_k V_k^T``, the best
rank-k approximation in Frobenius norm), as :func:`lorafed.wire.factors.merge_adapters` does
for ``svd`` merging, whose code this reuses. The factors are rescaled to the global LoRA
scaling ``global_alpha / global_rank``. The head is a full weight: its weighted mean is exact.

A client of rank r_i starts its next round from the global delta truncated to its own rank
(:func:`truncate_for_client`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lorafed.wire.factors import LoraFactors, MergeError, delta_weights, lora_modules, merge_adapters


@dataclass(frozen=True)
class HeteroResult:
    """A rank-truncated aggregate.

    Attributes:
        tensors: The global adapter's tensors (LoRA factors of ``global_rank``, the head), fp32.
        truncation: Module prefix -> relative Frobenius error ``||S_{>k}|| / ||S||`` of the truncation.
    """

    tensors: dict[str, torch.Tensor]
    truncation: dict[str, float]


def _rescale(tensors: Mapping[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """Multiply every LoRA factor by ``sqrt(factor)`` (so B @ A is multiplied by ``factor``)."""
    root = math.sqrt(factor)
    pairs = lora_modules(tensors)
    lora = {k for ab in pairs.values() for k in ab}
    return {k: (v * root if k in lora else v).float() for k, v in tensors.items()}


def aggregate_hetero_rank_report(
    updates: Sequence[tuple[Mapping[str, torch.Tensor], float, int, float]],
    global_rank: int,
    global_alpha: float,
) -> HeteroResult:
    """Aggregate updates of different LoRA ranks into a global adapter of ``global_rank``.

    Args:
        updates: ``(tensors, weight, r, alpha)`` per client: its peft-format adapter tensors,
            its FedAvg weight (e.g. training rows; normalised here), its LoRA rank and alpha.
        global_rank: Rank of the global adapter's factors.
        global_alpha: LoRA alpha of the global adapter (its scaling is ``global_alpha / global_rank``).

    Returns:
        The global tensors and the relative truncation error of every module.

    Raises:
        MergeError: No updates, bad weights, mismatched modules or head shapes, a factor whose
            rank disagrees with its ``r``, or a global rank larger than a weight allows.
    """
    if global_rank < 1 or not global_alpha > 0:
        raise MergeError(f"global rank must be >= 1 and alpha > 0, got r={global_rank}, alpha={global_alpha}")
    adapters = [LoraFactors(t, int(r), float(alpha)) for t, _, r, alpha in updates]
    merged = merge_adapters(adapters, [w for _, w, _, _ in updates], "svd", rank=global_rank)
    # merge_adapters' svd result has scaling 1 (B A = delta); the global adapter's is alpha/r.
    tensors = _rescale(merged.tensors, global_rank / global_alpha)
    return HeteroResult(tensors, merged.truncation)


def aggregate_hetero_rank(
    updates: Sequence[tuple[Mapping[str, torch.Tensor], float, int, float]],
    global_rank: int,
    global_alpha: float,
) -> dict[str, torch.Tensor]:
    """The global adapter's tensors (see :func:`aggregate_hetero_rank_report`)."""
    return aggregate_hetero_rank_report(updates, global_rank, global_alpha).tensors


def truncate_for_client(
    global_tensors: Mapping[str, torch.Tensor], global_rank: int, global_alpha: float, r: int, alpha: float
) -> dict[str, torch.Tensor]:
    """The global adapter as a client of rank ``r`` and alpha ``alpha`` loads it: its delta truncated to rank ``r``.

    Raises:
        MergeError: ``r`` larger than a weight allows.
    """
    return aggregate_hetero_rank([(global_tensors, 1.0, global_rank, global_alpha)], r, alpha)


def dense_deltas(tensors: Mapping[str, torch.Tensor], r: int, alpha: float) -> dict[str, torch.Tensor]:
    """Module prefix -> ``(alpha / r) B @ A`` (float64), the change an adapter makes to each weight."""
    return delta_weights(LoraFactors(tensors, r, alpha))

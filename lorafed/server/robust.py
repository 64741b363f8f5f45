"""Robust aggregation: defences against a client that sends a poisoned update.

Pure functions over ``Mapping[str, Tensor]`` state dicts, computed in fp32; no config, no I/O.

* :func:`clip_update` bounds one update's *delta* from the global adapter,
  ``d = u - g``, to an L2 norm of at most ``c`` over all tensors together:
  ``u' = g + d * min(1, c / ||d||)``. It needs one update at a time, so it streams.
* :func:`trimmed_mean` and :func:`coordinate_median` are coordinate-wise: for every scalar
  of every tensor they sort the clients' values. They therefore need *all* updates of the round
  in memory at once (``K x adapter size`` in fp32) and ignore the clients' sample counts (a
  client that lies about ``num_examples`` gains nothing).

As with FedAvg, every tensor (LoRA A and B included) is treated separately: the median of the
A's and of the B's is not the median of the products B·A.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from lorafed.errors import AggregationError

#: Robust aggregation rules (``none``: the weighted mean).
Robust = Literal["none", "trimmed_mean", "median"]

State = Mapping[str, torch.Tensor]


def delta_norm(update: State, reference: State) -> float:
    """L2 norm of ``update - reference`` over all tensors together (the square root of the sum of squares)."""
    total = 0.0
    for name, value in update.items():
        diff = value.to(torch.float32) - reference[name].to(torch.float32)
        total += float(torch.sum(diff.to(torch.float64) ** 2))
    return math.sqrt(total)


def clip_update(update: State, reference: State, max_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale the update's delta from ``reference`` down to an L2 norm of at most ``max_norm``.

    Args:
        update: One client's adapter tensors.
        reference: The global adapter the client started from (same keys).
        max_norm: The bound c > 0.

    Returns:
        ``(g + d * min(1, c / ||d||), ||d||)`` in fp32; the update unchanged (as fp32) when
        ``||d|| <= c``.

    Raises:
        AggregationError: ``max_norm`` not positive, or keys missing from ``reference``.
    """
    if not max_norm > 0:
        raise AggregationError(f"clip_update_norm must be > 0, got {max_norm}")
    missing = sorted(set(update) - set(reference))
    if missing:
        raise AggregationError(f"update tensors not in the global adapter: {missing[:3]}")
    norm = delta_norm(update, reference)
    scale = 1.0 if norm <= max_norm else max_norm / norm
    out = {}
    for name, value in update.items():
        ref = reference[name].to(torch.float32)
        out[name] = value.to(torch.float32) if scale == 1.0 else ref + (value.to(torch.float32) - ref) * scale
    return out, norm


def _stacked(updates: Sequence[State]) -> dict[str, torch.Tensor]:
    if not updates:
        raise AggregationError("no updates to aggregate")
    keys = updates[0].keys()
    for i, u in enumerate(updates[1:], start=1):
        if u.keys() != keys:
            diff = sorted(set(u) ^ set(keys))
            raise AggregationError(f"update {i} has different tensors than the first: {diff[:3]}")
    out = {}
    for k in keys:
        shapes = {tuple(u[k].shape) for u in updates}
        if len(shapes) != 1:
            raise AggregationError(f"tensor {k}: the updates' shapes differ: {sorted(shapes)}")
        out[k] = torch.stack([u[k].to(torch.float32) for u in updates])
    return out


def trimmed_mean(updates: Sequence[State], trim_ratio: float) -> dict[str, torch.Tensor]:
    """Coordinate-wise trimmed mean: drop the ``floor(trim_ratio * K)`` largest and smallest values.

    For every coordinate, the K clients' values are sorted, ``t = floor(trim_ratio * K)`` are cut
    from each end and the remaining ``K - 2t`` are averaged (unweighted), as
    ``scipy.stats.trim_mean(x, trim_ratio, axis=0)`` does.

    Raises:
        AggregationError: ``trim_ratio`` outside [0, 0.5), no updates, or mismatched tensors.
    """
    if not 0 <= trim_ratio < 0.5:
        raise AggregationError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    stacked = _stacked(updates)
    n = len(updates)
    cut = int(trim_ratio * n)
    return {k: torch.sort(v, dim=0).values[cut : n - cut].mean(dim=0) for k, v in stacked.items()}


def coordinate_median(updates: Sequence[State]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median (unweighted); for an even count, the mean of the two middle values (as ``np.median``).

    Raises:
        AggregationError: No updates, or mismatched tensors.
    """
    stacked = _stacked(updates)
    n = len(updates)
    out = {}
    for k, v in stacked.items():
        s = torch.sort(v, dim=0).values
        out[k] = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return out

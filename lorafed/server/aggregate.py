"""Aggregation: the sample-weighted mean of adapter tensors, w = sum_i (n_i / n) w_i.

Pure functions over ``Mapping[str, Tensor]`` and weights: no config, no I/O. Updates are
streamed into one fp64 accumulator, so memory does not grow with the number of clients, and
neither values near the fp32 limit nor large weights overflow the sum (fp64 holds up to ~1.8e308:
a weight of 1e9 times the largest fp32 is ~3.4e47). The mean is checked to be finite in fp32
before it is returned: a non-finite global adapter is never produced.

``fedavg`` averages every tensor *separately*, LoRA's A and B included. That is what FedAvg
computes; note it is not the mean of the clients' products B_i A_i (see the README).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Literal

import torch

from lorafed.errors import AggregationError

#: FedAvg weights: ``samples`` (w_i = n_i) or ``uniform`` (w_i = 1).
Weighting = Literal["samples", "uniform"]


class WeightedMean:
    """Streaming weighted mean of tensor dicts, accumulated in fp64 and returned in fp32.

    Example:
        >>> acc = WeightedMean()
        >>> acc.add({"w": torch.ones(2)}, 3.0)
        >>> acc.add({"w": torch.zeros(2)}, 1.0)
        >>> acc.result()["w"].tolist()
        [0.75, 0.75]
    """

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] | None = None
        self._total = 0.0
        self.count = 0

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        """Add one update with weight ``weight`` (> 0).

        Raises:
            AggregationError: Non-positive weight, or keys/shapes that differ from the first update.
        """
        if not (weight > 0 and math.isfinite(weight)):
            raise AggregationError(f"update weight must be > 0, got {weight} (and finite)")
        if self._sum is None:
            self._sum = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in tensors.items()}
        if tensors.keys() != self._sum.keys():
            diff = sorted(set(tensors) ^ set(self._sum))
            raise AggregationError(f"update {self.count} has different tensors than the first: {diff[:3]}")
        accs, values = [], []
        for k, v in tensors.items():
            acc = self._sum[k]
            if v.shape != acc.shape:
                raise AggregationError(f"tensor {k}: shape {tuple(v.shape)} != {tuple(acc.shape)}")
            accs.append(acc)
            values.append(v if v.dtype == torch.float64 else v.to(torch.float64))
        # One fused multi-tensor kernel (as torch's optimizers use) instead of one add_ per tensor:
        # with ~26 small adapter tensors, per-op dispatch would cost more than the arithmetic.
        torch._foreach_add_(accs, values, alpha=float(weight))
        self._total += float(weight)
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        """The weighted mean of everything added so far.

        Raises:
            AggregationError: Nothing was added, or the mean is not finite in fp32 (a NaN or Inf
                was added, or a mean beyond the fp32 range), naming the tensor.
        """
        if self._sum is None or self.count == 0:
            raise AggregationError("no updates to aggregate")
        out = {k: (v / self._total).to(torch.float32) for k, v in self._sum.items()}
        require_finite(out, f"the weighted mean of {self.count} update(s)")
        return out


def require_finite(state: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse a state with a NaN or Inf anywhere.

    Raises:
        AggregationError: Naming ``what``, the first non-finite tensor and its count of bad values.
    """
    for name, value in state.items():
        if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise AggregationError(
                f"{what} is not finite: tensor {name} has {bad} NaN/Inf value(s); nothing was published"
            )


def fedavg(updates: Iterable[tuple[Mapping[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """Weighted FedAvg: sum_i (w_i / sum_j w_j) x_i for every tensor, in fp32.

    Args:
        updates: ``(tensors, weight)`` pairs, consumed one at a time (a generator that loads
            each update lazily keeps memory flat). For sample weighting pass ``num_examples``.

    Returns:
        The averaged tensors (fp32).
    """
    acc = WeightedMean()
    for tensors, weight in updates:
        acc.add(tensors, weight)
    return acc.result()

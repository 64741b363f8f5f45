"""Which adapter tensors each aggregation mode trains, sends and averages in a round.

Averaging LoRA factors separately is not averaging the clients' updates: the mean of B_i times
the mean of A_i is not the mean of the products B_i A_i. The exact modes make one factor
identical on every client, so the average of the products is the product with the average:

- ``fedavg``: every tensor is trained and sent; A and B are averaged separately (inexact).
- ``ffa`` (FFA-LoRA, Sun et al. 2024): A stays frozen at the shared seeded initialisation; B
  and the head are trained and sent. mean_i(B_i A) = mean_i(B_i) A exactly; uploads halve.
- ``rolora`` (RoLoRA, Chen et al. 2024): rounds alternate. Odd rounds train and send B and the
  head with A shared, even rounds A and the head with B shared; each round's average is exact.
  B goes first because peft initialises B to zero, where the gradient of A is zero.
- ``head``: only the classifier head is trained and sent; A and B stay at their seeded
  initialisation (B = 0, so the backbone computes what it did before LoRA): a linear probe.
  The fewest coordinates (770 for MiniLM and 2 labels, against 74k with LoRA r=8 on query and
  value), which is what record-level DP needs: its noise norm grows with the square root of
  the trainable coordinates (:mod:`lorafed.client.dp`). Exact, like every mode that trains
  only the head.

The head is a plain linear layer and is trained and averaged in every mode. The server keeps
every tensor; a round's average replaces only the tensors that were sent (:func:`apply_round`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import torch

from lorafed.errors import AggregationError

#: Aggregation modes, the one place their names are defined.
Aggregation = Literal["fedavg", "ffa", "rolora", "head"]

Role = Literal["lora_A", "lora_B", "head"]
ALL_ROLES: frozenset[Role] = frozenset({"lora_A", "lora_B", "head"})


def tensor_role(name: str) -> Role:
    """``lora_A``, ``lora_B`` or ``head`` for an adapter tensor or a model parameter name."""
    if ".lora_A." in name:
        return "lora_A"
    if ".lora_B." in name:
        return "lora_B"
    return "head"


def round_roles(aggregation: Aggregation, round_: int | None) -> frozenset[Role]:
    """The roles trained and sent in ``round_`` (1-based) under ``aggregation``.

    ``round_=None`` means "any round" and gives every role (a global adapter holds them all).
    """
    if round_ is None or aggregation == "fedavg":
        return ALL_ROLES
    if aggregation == "ffa":
        return frozenset({"lora_B", "head"})
    if aggregation == "head":
        return frozenset({"head"})
    if aggregation == "rolora":
        return frozenset({"lora_B" if round_ % 2 == 1 else "lora_A", "head"})
    raise ValueError(f"unknown aggregation {aggregation!r}")  # unreachable: the config checks the Literal


def round_keys(aggregation: Aggregation, round_: int | None, keys: Iterable[str]) -> list[str]:
    """The adapter keys an update of ``round_`` carries, in the order of ``keys``."""
    roles = round_roles(aggregation, round_)
    return [k for k in keys if tensor_role(k) in roles]


def select(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The sub-dict of ``state`` with ``keys``."""
    return {k: state[k] for k in keys}


def apply_round(
    global_state: Mapping[str, torch.Tensor], averaged: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The new global adapter: the round's averaged tensors over the previous global ones.

    Raises:
        AggregationError: ``averaged`` holds a tensor the global adapter does not.
    """
    unknown = sorted(set(averaged) - set(global_state))
    if unknown:
        raise AggregationError(f"averaged tensors not in the global adapter: {unknown[:3]}")
    return {**global_state, **averaged}


@contextlib.contextmanager
def trainable_roles(model: Any, roles: frozenset[Role]) -> Iterator[list[str]]:
    """Within the block, only the model's adapter parameters of ``roles`` require gradients.

    Adapter parameters are those trainable on entry (LoRA factors and the head); the backbone
    stays frozen. Their ``requires_grad`` flags are restored on exit.

    Yields:
        Names of the parameters left trainable.
    """
    adapter = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    try:
        for n, p in adapter:
            p.requires_grad_(tensor_role(n) in roles)
        yield [n for n, p in adapter if p.requires_grad]
    finally:
        for _, p in adapter:
            p.requires_grad_(True)

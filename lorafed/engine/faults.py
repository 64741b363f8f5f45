"""Fault and attack injection for the simulator: wrappers for ``simulate(..., client_fn=...)``.

Each function returns a wrapper that takes the real client round (``train_client``) and returns
one that misbehaves for the chosen clients and rounds, and trains normally otherwise. They exist to
test lorafed's defences (validation, dropout handling, robust aggregation) with the real training
path, and to measure them (``scripts/robustness.py``, ``scripts/reliability.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lorafed.engine.cohort import ClientFn, Cohort

Wrapper = Callable[["ClientFn"], "ClientFn"]


def _hits(fed: Cohort, k: int, r: int, clients: Collection[str], rounds: Collection[int] | None) -> bool:
    return fed.partition.client_ids[k] in clients and (rounds is None or r in rounds)


def scale_update(clients: Collection[str], factor: float, rounds: Collection[int] | None = None) -> Wrapper:
    """The chosen clients send ``g + factor * (u - g)``: their delta from the global adapter, scaled.

    ``factor=100`` is a boosted (model-replacement style) update, ``factor=-1`` a sign flip.

    Args:
        clients: Client ids that attack.
        factor: The multiplier of the delta.
        rounds: Rounds in which they attack (``None``: every round).
    """

    def wrap(inner: ClientFn) -> ClientFn:
        def client(fed: Cohort, state: dict[str, torch.Tensor], k: int, r: int):
            tensors, result = inner(fed, state, k, r)
            if _hits(fed, k, r, clients, rounds):
                tensors = {n: state[n] + factor * (v - state[n]) for n, v in tensors.items()}
            return tensors, result

        return client

    return wrap


def fail_clients(clients: Collection[str], rounds: Collection[int] | None = None, times: int | None = None) -> Wrapper:
    """The chosen clients raise ``RuntimeError`` instead of training.

    Args:
        clients: Client ids that fail.
        rounds: Rounds in which they fail (``None``: every round).
        times: Fail only on the first ``times`` calls that match (``None``: always), e.g. to
            test that a retried round succeeds.
    """
    budget = {"n": times}

    def wrap(inner: ClientFn) -> ClientFn:
        def client(fed: Cohort, state: dict[str, torch.Tensor], k: int, r: int):
            if _hits(fed, k, r, clients, rounds) and (budget["n"] is None or budget["n"] > 0):
                if budget["n"] is not None:
                    budget["n"] -= 1
                raise RuntimeError(f"injected failure of client {fed.partition.client_ids[k]} in round {r}")
            return inner(fed, state, k, r)

        return client

    return wrap


def delay_clients(clients: Collection[str], seconds: float, rounds: Collection[int] | None = None) -> Wrapper:
    """The chosen clients train normally, then wait ``seconds`` before returning their update."""

    def wrap(inner: ClientFn) -> ClientFn:
        def client(fed: Cohort, state: dict[str, torch.Tensor], k: int, r: int):
            out = inner(fed, state, k, r)
            if _hits(fed, k, r, clients, rounds):
                time.sleep(seconds)
            return out

        return client

    return wrap


def chain(*wrappers: Wrapper) -> Wrapper:
    """Apply several wrappers (the first given is the outermost)."""

    def wrap(inner: ClientFn) -> ClientFn:
        for w in reversed(wrappers):
            inner = w(inner)
        return inner

    return wrap

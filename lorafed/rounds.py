"""The server's policy for a round, shared by the simulator, Flower and the file-drop coordinator.

:class:`RoundPolicy` decides which clients train in a round and turns the round's update files
into the next global adapter: sample-weighted (or uniform) FedAvg, or, with ``federation.dp``,
clipped-and-noised DP-FedAvg with its accountant. Every engine calls the same two methods, so a
Flower deployment and a simulation with the same seeds produce the same adapters.
"""

from __future__ import annotations

import math
import secrets
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafed.config import FederationConfig
from lorafed.privacy import DPSum, calibrate_noise, compute_epsilon, poisson_sample
from lorafed.server import RoundOutcome, aggregate_files, next_global, require_enough
from lorafed.server_opt import ServerOptState
from lorafed.validate import UpdateSpec


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


def sample_clients(num_clients: int, fraction: float, min_clients: int, seed: int, round_: int) -> list[int]:
    """Sorted indices of the clients that train in ``round_`` (at least ``min_clients``)."""
    k = min(num_clients, max(min_clients, math.ceil(fraction * num_clients)))
    if k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_])
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))


@dataclass
class RoundResult:
    """A finished round: the new global adapter, what was accepted/rejected, privacy figures.

    ``state`` is ``None`` when too few updates were valid (see :meth:`RoundPolicy.try_aggregate`).
    """

    state: dict[str, torch.Tensor] | None
    outcome: RoundOutcome
    privacy: dict[str, Any] = field(default_factory=dict)


class RoundPolicy:
    """Client selection and aggregation of one federation.

    Aggregation is the whole server step: validation, optional update clipping and robust
    rule, (sample-weighted) FedAvg or DP-FedAvg, the LoRA mode's merge of the tensors sent into
    the global adapter, and the server optimizer, whose state this object carries across rounds.

    Args:
        fcfg: The federation settings.
        num_clients: N, the clients that could be asked (partitions, nodes or silos).
        seed: The run seed (client sampling).
    """

    def __init__(self, fcfg: FederationConfig, num_clients: int, seed: int) -> None:
        self.fcfg = fcfg
        self.num_clients = num_clients
        self.seed = seed
        self.server_opt: ServerOptState | None = None
        self.dp = fcfg.dp if fcfg.dp.enabled else None
        self.noise_multiplier = 0.0
        self.generator: torch.Generator | None = None
        if self.dp is not None:
            z = self.dp.noise_multiplier
            if z is None:
                z = calibrate_noise(float(self.dp.target_epsilon or 0), fcfg.fraction, fcfg.rounds, self.dp.delta)
            self.noise_multiplier = z
            self.generator = torch.Generator()
            noise_seed = self.dp.noise_seed if self.dp.noise_seed is not None else secrets.randbits(62)
            self.generator.manual_seed(noise_seed)

    def choose(self, round_: int) -> list[int]:
        """Indices of the clients asked to train in ``round_``.

        Without DP: a seeded sample of ``ceil(fraction * N)`` (at least ``min_clients``). With DP and
        ``fraction < 1``: Poisson sampling with rate ``fraction``, which the accountant assumes.
        """
        if self.dp is not None and self.fcfg.fraction < 1:
            return poisson_sample(self.num_clients, self.fcfg.fraction, np.random.default_rng([self.seed, round_, 1]))
        return sample_clients(self.num_clients, self.fcfg.fraction, self.fcfg.min_clients, self.seed, round_)

    def min_valid(self, asked: int) -> int:
        """The fewest valid updates a round that asked ``asked`` clients needs.

        Under DP with Poisson sampling a round may ask fewer than ``min_clients``; the noised
        release is still valid, so the bound is the number asked.
        """
        return min(self.fcfg.min_clients, asked) if self.dp is not None else self.fcfg.min_clients

    def try_aggregate(
        self,
        paths: Sequence[str | Path],
        spec: UpdateSpec,
        reference: Mapping[str, torch.Tensor],
        round_: int,
        asked: int | None = None,
    ) -> RoundResult:
        """Validate and aggregate the round's update files into the next global adapter.

        Args:
            paths: The round's update files.
            spec: What every update must match.
            reference: The global adapter the clients started from (every tensor).
            round_: The round (for the privacy accountant).
            asked: How many clients were asked (default: ``len(paths)``).

        Returns:
            The result; its ``state`` is ``None`` (and nothing changed) when fewer than
            :meth:`min_valid` updates were valid.
        """
        f = self.fcfg
        need = self.min_valid(len(paths) if asked is None else asked)
        if self.dp is None:
            outcome = aggregate_files(
                paths,
                spec,
                f.weighting,
                need,
                reference=reference,
                clip_update_norm=f.clip_update_norm,
                robust=f.robust,
                trim_ratio=f.trim_ratio,
            )
            acc = None
        else:
            sent = {k: reference[k] for k in spec.tensors}  # ffa/rolora send a subset
            acc = DPSum(sent, self.dp.clip_norm, self.noise_multiplier, f.fraction * self.num_clients, self.generator)
            outcome = aggregate_files(paths, spec, "uniform", need, accumulator=acc)
        if outcome.state is None:
            return RoundResult(None, outcome)
        state, self.server_opt = next_global(reference, outcome.state, f, self.server_opt)
        privacy: dict[str, Any] = {}
        if acc is not None and self.dp is not None:
            privacy = {
                "epsilon": compute_epsilon(f.fraction, self.noise_multiplier, round_, self.dp.delta),
                "delta": self.dp.delta,
                "noise_multiplier": self.noise_multiplier,
                "clip_norm": self.dp.clip_norm,
                "sample_rate": f.fraction,
                **acc.stats(),
            }
        return RoundResult(state, outcome, privacy)

    def aggregate(
        self,
        paths: Sequence[str | Path],
        spec: UpdateSpec,
        reference: Mapping[str, torch.Tensor],
        round_: int,
    ) -> RoundResult:
        """Like :meth:`try_aggregate`, but a round without enough valid updates is an error.

        Raises:
            AggregationError: Fewer valid updates than :meth:`min_valid`, naming the rejected ones.
        """
        result = self.try_aggregate(paths, spec, reference, round_)
        if result.state is None:
            require_enough(result.outcome, self.min_valid(len(paths)), round_)
        return result

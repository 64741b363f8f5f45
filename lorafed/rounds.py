"""The server's policy for a round, shared by the simulator, Flower and the file-drop coordinator.

:class:`RoundPolicy` decides which clients train in a round and turns the round's update files
into the next global adapter: sample-weighted (or uniform) FedAvg, or, with ``federation.dp``,
clipped-and-noised DP-FedAvg with its accountant. Every engine calls the same two methods, so a
Flower deployment and a simulation with the same seeds produce the same adapters.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafed.config import FederationConfig
from lorafed.privacy import DPSum, calibrate_noise, compute_epsilon, poisson_sample
from lorafed.server import RoundOutcome, aggregate_files, require_enough
from lorafed.validate import UpdateSpec


def client_seed(seed: int, round_: int, client_index: int) -> int:
    """A distinct, reproducible seed for one client's round."""
    return (seed * 1_000_003 + round_ * 10_007 + client_index) % (2**31 - 1)


def sample_clients(num_clients: int, fraction: float, min_clients: int, seed: int, round_: int) -> list[int]:
    """Sorted indices of the clients that train in ``round_`` (at least ``min_clients``)."""
    k = min(num_clients, max(min_clients, math.ceil(fraction * num_clients)))
    if k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_])
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))


@dataclass
class RoundResult:
    """A finished round: the new global adapter, what was accepted/rejected, privacy figures."""

    state: dict[str, torch.Tensor]
    outcome: RoundOutcome
    privacy: dict[str, Any] = field(default_factory=dict)


class RoundPolicy:
    """Client selection and aggregation of one federation.

    Args:
        fcfg: The federation settings.
        num_clients: N, the clients that could be asked (partitions, nodes or silos).
        seed: The run seed (client sampling).
    """

    def __init__(self, fcfg: FederationConfig, num_clients: int, seed: int) -> None:
        self.fcfg = fcfg
        self.num_clients = num_clients
        self.seed = seed
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

    def aggregate(
        self,
        paths: Sequence[str | Path],
        spec: UpdateSpec,
        reference: Mapping[str, torch.Tensor],
        round_: int,
    ) -> RoundResult:
        """Validate and aggregate the round's update files into the next global adapter.

        Raises:
            AggregationError: Fewer valid updates than ``min_clients`` (under DP: than asked, if fewer).
        """
        f = self.fcfg
        if self.dp is None:
            outcome = aggregate_files(paths, spec, f.weighting, f.min_clients)
            return RoundResult(dict(require_enough(outcome, f.min_clients, round_)), outcome)
        acc = DPSum(reference, self.dp.clip_norm, self.noise_multiplier, f.fraction * self.num_clients, self.generator)
        # Under Poisson sampling a round may ask fewer than min_clients; the noised release is still valid.
        need = min(f.min_clients, len(paths))
        outcome = aggregate_files(paths, spec, "uniform", need, accumulator=acc)
        state = dict(require_enough(outcome, need, round_))
        privacy = {
            "epsilon": compute_epsilon(f.fraction, self.noise_multiplier, round_, self.dp.delta),
            "delta": self.dp.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.dp.clip_norm,
            "sample_rate": f.fraction,
            **acc.stats(),
        }
        return RoundResult(state, outcome, privacy)

"""Client-level differential privacy (DP-FedAvg) and its Rényi-DP accountant.

The mechanism (McMahan et al. 2018, "Learning differentially private recurrent language
models"): each sampled client's update is turned into a delta from the round's global adapter,
the delta's L2 norm (over *all* tensors together) is clipped to ``C``, the server sums the
clipped deltas, adds Gaussian noise N(0, (z C)^2) to every coordinate, and divides by the
*expected* number of clients ``q N``; the new global adapter is the old one plus that mean.

Why uniform weights and the expected count: one client can change the clipped sum by at most
``C`` (add/remove-one-client adjacency), which is what the noise is calibrated to. With sample
weights n_i / sum(n) a client's influence scales with its size and the normaliser depends on
every client's private size, so neither the sensitivity bound nor the released count would hold.

The accountant computes the Rényi DP of the sampled Gaussian mechanism exactly for integer
orders (Mironov, Talwar & Zhang 2019, Sec. 3.3) with Poisson sampling rate ``q``; with ``q = 1``
(every client in every round) it is the Gaussian mechanism's ``alpha / (2 z^2)`` for any real
order. RDP is converted to (epsilon, delta) with Balle et al. 2020, Thm. 21 (as in Opacus).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from lorafed.errors import AggregationError, ConfigError

#: Rényi orders tried by the accountant: fine fractional orders (used when q = 1) and integers.
FRACTIONAL_ORDERS: tuple[float, ...] = tuple(1.0 + x / 20 for x in range(1, 200))
INTEGER_ORDERS: tuple[int, ...] = (*range(2, 64), 80, 96, 128, 160, 192, 256, 384, 512)


def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm of a tensor dict (all tensors flattened together), in fp64."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in delta.values()))


def clip_delta(
    update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], clip_norm: float
) -> tuple[dict[str, torch.Tensor], float]:
    """The update's delta from ``reference``, scaled by ``min(1, C / ||delta||)``.

    Returns:
        The clipped delta (fp32) and the norm of the unclipped delta.
    """
    delta = {k: update[k].to(torch.float32) - reference[k].to(torch.float32) for k in reference}
    norm = update_norm(delta)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in delta.items()}, norm


class DPSum:
    """Accumulator of clipped deltas that releases ``reference + (sum + noise) / expected``.

    Same interface as :class:`lorafed.server.aggregate.WeightedMean` (``add``, ``count``, ``result``) so
    the server's streaming loop uses either. Every update counts once (weight 1): see the module
    docstring for why sample weights cannot be used under DP.

    Args:
        reference: The round's global adapter (deltas are taken from it).
        clip_norm: C, the bound on each client's delta norm.
        noise_multiplier: z; the noise std on the sum is z * C.
        expected_clients: q * N, the divisor (not the number of updates received).
        generator: Source of the noise (``None``: torch's default generator).
    """

    def __init__(
        self,
        reference: Mapping[str, torch.Tensor],
        clip_norm: float,
        noise_multiplier: float,
        expected_clients: float,
        generator: torch.Generator | None = None,
    ) -> None:
        if not clip_norm > 0 or noise_multiplier < 0 or not expected_clients > 0:
            raise AggregationError(
                f"DP needs clip_norm > 0, noise_multiplier >= 0 and expected_clients > 0; got "
                f"{clip_norm}, {noise_multiplier}, {expected_clients}"
            )
        self.reference = {k: v.to(torch.float32) for k, v in reference.items()}
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.expected_clients = expected_clients
        self.generator = generator
        self._sum = {k: torch.zeros_like(v) for k, v in self.reference.items()}
        self.norms: list[float] = []
        self.count = 0

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        """Clip one update's delta and add it.

        Raises:
            AggregationError: A weight other than 1 (DP aggregation is uniform), or other tensors.
        """
        if weight != 1.0:
            raise AggregationError(f"DP aggregation weights every update 1 (uniform), got weight {weight}")
        if tensors.keys() != self.reference.keys():
            diff = sorted(set(tensors) ^ set(self.reference))
            raise AggregationError(f"update {self.count} has different tensors than the global adapter: {diff[:3]}")
        clipped, norm = clip_delta(tensors, self.reference, self.clip_norm)
        for k, v in clipped.items():
            self._sum[k].add_(v)
        self.norms.append(norm)
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        """The noised new global adapter (fresh noise on every call)."""
        std = self.noise_multiplier * self.clip_norm
        out = {}
        for k, s in self._sum.items():
            noise = torch.randn(s.shape, generator=self.generator, dtype=torch.float32) * std
            out[k] = self.reference[k] + (s + noise) / self.expected_clients
        return out

    def stats(self) -> dict[str, float]:
        """Clipping statistics of this round (median delta norm, share of clipped updates)."""
        if not self.norms:
            return {"clipped_fraction": 0.0, "median_delta_norm": 0.0}
        return {
            "clipped_fraction": sum(n > self.clip_norm for n in self.norms) / len(self.norms),
            "median_delta_norm": float(np.median(self.norms)),
        }


def rdp_sampled_gaussian(q: float, noise_multiplier: float, orders: Sequence[float]) -> np.ndarray:
    """RDP epsilon(alpha) of one step of the Poisson-sampled Gaussian mechanism (sensitivity 1).

    For ``q = 1``: ``alpha / (2 z^2)``. For ``0 < q < 1`` and integer alpha:
    ``log(sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 z^2))) / (alpha - 1)``.
    Non-integer orders give ``inf`` when ``q < 1``.

    Raises:
        ConfigError: q outside (0, 1] or a non-positive noise multiplier.
    """
    if not 0 < q <= 1:
        raise ConfigError([f"sampling rate q must be in (0, 1], got {q}"], "privacy")
    if not noise_multiplier > 0:
        raise ConfigError([f"noise_multiplier must be > 0 for a finite epsilon, got {noise_multiplier}"], "privacy")
    sigma2 = noise_multiplier**2
    out = np.empty(len(orders))
    for i, a in enumerate(orders):
        if q == 1.0:
            out[i] = a / (2 * sigma2)
        elif float(a).is_integer() and a >= 2:
            n = int(a)
            k = np.arange(n + 1)
            log_binom = np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in k])
            terms = log_binom + (n - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma2)
            out[i] = float(np.logaddexp.reduce(terms)) / (n - 1)
        else:
            out[i] = math.inf
    return out


def epsilon_from_rdp(rdp: np.ndarray, orders: Sequence[float], delta: float) -> tuple[float, float]:
    """Smallest epsilon over ``orders`` for the given ``delta`` (Balle et al. 2020, Thm. 21).

    Returns:
        ``(epsilon, best_order)``.
    """
    a = np.asarray(orders, dtype=float)
    eps = rdp + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)
    eps = np.where(np.isfinite(eps), eps, np.inf)
    i = int(np.argmin(eps))
    return max(float(eps[i]), 0.0), float(a[i])


def compute_epsilon(q: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """(epsilon, delta)-DP epsilon after ``steps`` rounds of the sampled Gaussian mechanism."""
    if steps == 0:
        return 0.0
    orders = (*FRACTIONAL_ORDERS, *INTEGER_ORDERS) if q == 1.0 else INTEGER_ORDERS
    return epsilon_from_rdp(steps * rdp_sampled_gaussian(q, noise_multiplier, orders), orders, delta)[0]


def calibrate_noise(target_epsilon: float, q: float, steps: int, delta: float) -> float:
    """Smallest noise multiplier (to 0.1 %) whose epsilon after ``steps`` rounds is <= the target.

    Raises:
        ConfigError: The target cannot be reached with any noise multiplier up to 1e4.
    """
    lo, hi = 1e-2, 1e4
    if compute_epsilon(q, hi, steps, delta) > target_epsilon:
        raise ConfigError([f"target_epsilon {target_epsilon} is unreachable with noise_multiplier <= {hi}"], "privacy")
    if compute_epsilon(q, lo, steps, delta) <= target_epsilon:
        return lo
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if compute_epsilon(q, mid, steps, delta) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def poisson_sample(num_clients: int, q: float, rng: np.random.Generator) -> list[int]:
    """Client indices sampled independently with probability ``q`` (what the accountant assumes)."""
    return [int(i) for i in np.flatnonzero(rng.random(num_clients) < q)]

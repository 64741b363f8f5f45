"""The server step: a round's received updates become the next global adapter.

Every engine hands the server the same thing, a list of :class:`Incoming` updates (bytes from a
Flower message, a file-drop object or the in-process client; or a file for ``lorafed aggregate``),
and gets back a :class:`RoundResult`. Each update is parsed and validated exactly once here, so
nothing invalid is ever averaged and no engine needs its own checks.

:class:`RoundPolicy` is the federation's side of it: which clients train in a round (seeded
sampling, or Poisson sampling under DP), and the whole server step: validation, optional
update clipping or a robust rule, sample-weighted (or uniform) FedAvg or clipped-and-noised
DP-FedAvg with its accountant, the LoRA mode's merge and the server optimizer, whose state it
carries across rounds, as it carries each client's pinned ``num_examples`` claim (see
:mod:`lorafed.server.claims`). Only one update's tensors are in memory at a time (plus the fp32
accumulator), except for the coordinate-wise robust rules.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lorafed.server.aggregate import require_finite
from lorafed.server.fold import Incoming, RoundOutcome, fold_updates, require_enough
from lorafed.server.hetero import DenseUpdates, factorize, lora_rank
from lorafed.server.privacy import DPSum, calibrate_noise, compute_epsilon, poisson_sample
from lorafed.server.server_opt import ServerOptSettings, ServerOptState, server_step
from lorafed.server.validate import UpdateSpec
from lorafed.wire.roles import apply_round

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from lorafed.config import FederationConfig


def server_settings(fcfg: FederationConfig) -> ServerOptSettings | None:
    """The server optimizer of a federation, or ``None`` for plain averaging."""
    if fcfg.server_optimizer == "none":
        return None
    return ServerOptSettings(
        fcfg.server_optimizer, fcfg.server_lr, fcfg.server_beta1, fcfg.server_beta2, fcfg.server_tau
    )


def next_global(
    global_state: Mapping[str, torch.Tensor],
    averaged: Mapping[str, torch.Tensor],
    fcfg: FederationConfig,
    opt: ServerOptState | None = None,
) -> tuple[dict[str, torch.Tensor], ServerOptState | None]:
    """The global adapter after a round: the average (of the tensors sent) or a server-optimizer step.

    Args:
        global_state: The global adapter before the round (every tensor).
        averaged: The round's average; with ``ffa``/``rolora`` only the tensors sent this round.
        fcfg: The federation settings (``server_optimizer`` and its hyper-parameters).
        opt: The server optimizer state from the previous round (``None``: fresh).

    Returns:
        The new global adapter (every tensor) and the server optimizer state (``None`` without one).
    """
    settings = server_settings(fcfg)
    if settings is None:
        return apply_round(global_state, averaged), None
    return server_step(global_state, averaged, opt or ServerOptState(), settings)


def sample_clients(num_clients: int, fraction: float, min_clients: int, seed: int, round_: int) -> list[int]:
    """Sorted indices of the clients that train in ``round_`` (at least ``min_clients``)."""
    k = min(num_clients, max(min_clients, math.ceil(fraction * num_clients)))
    if k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_])
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))


@dataclass
class RoundResult:
    """A finished server step: the new global adapter, what was accepted or rejected, privacy figures.

    ``state`` is ``None`` when too few updates were valid (see :meth:`RoundPolicy.try_aggregate`).
    ``truncation``: with ``federation.hetero_ranks``, module -> relative Frobenius error of cutting
    the round's dense mean back to the global rank.
    """

    state: dict[str, torch.Tensor] | None
    outcome: RoundOutcome
    privacy: dict[str, Any] = field(default_factory=dict)
    truncation: dict[str, float] = field(default_factory=dict)


class RoundPolicy:
    """Client selection and the server step of one federation.

    Args:
        fcfg: The federation settings; besides the fields it always reads, the optional
            ``max_update_norm`` (reject an update whose delta from the global adapter has a larger
            L2 norm) and ``max_client_share`` (no client's share of the mean above it), both
            ``None`` (off) when the config does not have them (see :func:`fold_updates`).
        num_clients: N, the clients that could be asked (partitions, nodes or silos).
        seed: The run seed (client sampling).
        verifier: Client id -> public key (the key registry's clients): every update must be
            signed by the client it claims to be (see :func:`fold_updates`); ``None``: client
            ids are taken on trust.
    """

    def __init__(
        self,
        fcfg: FederationConfig,
        num_clients: int,
        seed: int,
        verifier: Mapping[str, Ed25519PublicKey] | None = None,
    ) -> None:
        self.fcfg = fcfg
        self.verifier = verifier
        self.num_clients = num_clients
        self.seed = seed
        self.server_opt: ServerOptState | None = None
        #: Client id -> its claim when an update of it was first accepted in this run (saved with
        #: each global adapter, so a resumed run keeps it; see :mod:`lorafed.server.claims`).
        self.claims: dict[str, float] = {}
        self.max_update_norm: float | None = fcfg.max_update_norm
        self.max_update_ratio: float | None = fcfg.max_update_ratio
        self.max_client_share: float | None = fcfg.max_client_share
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

    def update_bound(self, reference: Mapping[str, torch.Tensor]) -> float | None:
        """The largest delta norm accepted this round: ``max_update_norm``, and ``max_update_ratio``
        times the norm of the global adapter the clients started from (whichever is smaller).

        An honest round moves the adapter by a fraction of its own norm (MiniLM, r=8: the global
        is ~6 in L2, a 12-step round moves it ~0.5-3), so the default ratio of 10 refuses only
        boosted or corrupted updates.
        """
        bounds = [] if self.max_update_norm is None else [self.max_update_norm]
        if self.max_update_ratio is not None:
            ref = math.sqrt(sum(float(t.double().pow(2).sum()) for t in reference.values()))
            if ref > 0:
                bounds.append(self.max_update_ratio * ref)
        return min(bounds) if bounds else None

    def min_valid(self, asked: int) -> int:
        """The fewest valid updates a round that asked ``asked`` clients needs.

        Under DP with Poisson sampling a round may ask fewer than ``min_clients``; the noised
        release is still valid, so the bound is the number asked.
        """
        return min(self.fcfg.min_clients, asked) if self.dp is not None else self.fcfg.min_clients

    def try_aggregate(
        self,
        updates: Sequence[Incoming],
        spec: UpdateSpec,
        reference: Mapping[str, torch.Tensor],
        round_: int,
        asked: int | None = None,
        keep_bytes: bool = False,
    ) -> RoundResult:
        """Validate and aggregate the round's updates into the next global adapter.

        The spec gets the federation's weight cap (``federation.max_num_examples``), so every
        engine refuses an update that claims more examples than the cap; the claims policy
        (``max_examples_ratio``, ``over_ratio``, ``max_examples_growth``) compares each claim with
        the others' and with the client's pinned one (:attr:`claims`), which only a round that
        produces a global adapter updates; a weight above ``trust_weight_above`` x the others'
        median keeps it only if its update agrees with theirs (``trust_min_cosine``).

        Args:
            updates: The round's updates.
            spec: What every update must match.
            reference: The global adapter the clients started from (every tensor).
            round_: The round (for the privacy accountant).
            asked: How many clients were asked (default: ``len(updates)``).
            keep_bytes: Keep the accepted bytes in the outcome (for the run record).

        Returns:
            The result; its ``state`` is ``None`` (and nothing changed) when fewer than
            :meth:`min_valid` updates were valid.
        """
        f = self.fcfg
        spec = dataclasses.replace(spec, max_num_examples=f.max_num_examples, hetero_ranks=f.hetero_ranks)
        need = self.min_valid(len(updates) if asked is None else asked)
        bound = self.update_bound(reference)  # the global factors' norm, whatever the clients' ranks
        start = reference
        to_dense = None
        if f.hetero_ranks:  # clients of other ranks: the step works on dense changes (server.hetero)
            to_dense = DenseUpdates(reference, spec.lora, f.hetero_mode)
            start = to_dense.reference
        if self.dp is None:
            outcome = fold_updates(
                updates,
                spec,
                f.weighting,
                need,
                reference=start,
                clip_update_norm=f.clip_update_norm,
                robust=f.robust,
                trim_ratio=f.trim_ratio,
                keep_bytes=keep_bytes,
                max_update_norm=bound,
                max_share=self.max_client_share,
                min_cosine=f.min_update_cosine,
                max_examples_ratio=f.max_examples_ratio,
                over_ratio=f.over_ratio,
                max_examples_growth=f.max_examples_growth,
                known_claims=self.claims,
                verifier=self.verifier,
                dense=to_dense,
                trust_weight_above=f.trust_weight_above,
                trust_min_cosine=f.trust_min_cosine,
            )
            acc = None
        else:
            sent = {k: reference[k] for k in spec.tensors}  # ffa/rolora send a subset
            acc = DPSum(sent, self.dp.clip_norm, self.noise_multiplier, f.fraction * self.num_clients, self.generator)
            outcome = fold_updates(
                updates,
                spec,
                "uniform",
                need,
                accumulator=acc,
                keep_bytes=keep_bytes,
                reference=reference if bound is not None else None,
                max_update_norm=bound,
                verifier=self.verifier,
            )
        if outcome.state is None:
            return RoundResult(None, outcome)
        state, opt = next_global(start, outcome.state, f, self.server_opt)
        truncation: dict[str, float] = {}
        if f.hetero_ranks:  # the dense mean, cut back to the global rank by SVD
            cut = factorize(state, *lora_rank(spec.lora))
            state, truncation = {k: cut.tensors[k] for k in reference}, cut.truncation
        require_finite(state, f"round {round_}: the next global adapter")
        self.server_opt = opt
        for cid, claim in outcome.claims.items():  # a round that published nothing pins nothing
            self.claims.setdefault(cid, claim)
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
        return RoundResult(state, outcome, privacy, truncation)

    def aggregate(
        self,
        updates: Sequence[Incoming],
        spec: UpdateSpec,
        reference: Mapping[str, torch.Tensor],
        round_: int,
    ) -> RoundResult:
        """Like :meth:`try_aggregate`, but a round without enough valid updates is an error.

        Raises:
            AggregationError: Fewer valid updates than :meth:`min_valid`, naming the rejected ones.
        """
        result = self.try_aggregate(updates, spec, reference, round_)
        if result.state is None:
            require_enough(result.outcome, self.min_valid(len(updates)), round_)
        return result

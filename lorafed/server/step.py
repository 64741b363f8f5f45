"""The server step: a round's received updates become the next global adapter.

Every engine hands the server the same thing, a list of :class:`Incoming` updates (bytes from a
Flower message, a file-drop object or the in-process client; or a file for ``lorafed aggregate``),
and gets back a :class:`RoundResult`. Each update is parsed and validated exactly once here, so
nothing invalid is ever averaged and no engine needs its own checks.

:class:`RoundPolicy` is the federation's side of it: which clients train in a round (seeded
sampling, or Poisson sampling under DP), and the whole server step: validation, optional
update clipping or a robust rule, sample-weighted (or uniform) FedAvg or clipped-and-noised
DP-FedAvg with its accountant, the LoRA mode's merge and the server optimizer, whose state it
carries across rounds. Only one update's tensors are in memory at a time (plus the fp32
accumulator), except for the coordinate-wise robust rules.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lorafed.errors import AggregationError, PayloadError, PayloadValidationError
from lorafed.server.aggregate import WeightedMean, Weighting, require_finite
from lorafed.server.privacy import DPSum, calibrate_noise, compute_epsilon, poisson_sample
from lorafed.server.robust import Robust, clip_update, coordinate_median, delta_norm, trimmed_mean
from lorafed.server.server_opt import ServerOptSettings, ServerOptState, server_step
from lorafed.server.validate import UpdateSpec, validate_update
from lorafed.wire.payload import Payload, PayloadHeader, PayloadMeta, header_from_bytes, payload_with_header
from lorafed.wire.roles import merge_round

if TYPE_CHECKING:
    from lorafed.config import FederationConfig


@dataclass(frozen=True)
class Incoming:
    """One update as it reached the server: its bytes, or the file holding them.

    Attributes:
        source: Where it came from, for messages (a file path, ``node-7``, a drop name).
        data: The payload bytes (``None`` when ``path`` is given).
        path: A payload file, read when the update is folded in (memory stays flat in the
            number of files).
    """

    source: str
    data: bytes | None = None
    path: Path | None = None

    def read(self) -> bytes:
        """The payload bytes.

        Raises:
            PayloadError: The file is missing or unreadable.
        """
        if self.data is not None:
            return self.data
        if self.path is None or not self.path.is_file():
            raise PayloadError("payload file not found", path=self.source)
        try:
            return self.path.read_bytes()
        except OSError as exc:
            raise PayloadError(f"cannot read: {exc.strerror}", path=self.source) from exc

    @classmethod
    def from_file(cls, path: str | Path) -> Incoming:
        """An update read from ``path`` when it is folded in."""
        return cls(str(path), path=Path(path))


@dataclass
class RoundOutcome:
    """What a round's aggregation produced.

    Attributes:
        state: The new global adapter tensors (fp32), or ``None`` if too few updates were valid.
        accepted: ``(source, header)`` of every update averaged.
        rejected: ``(source, reason)`` of every update refused; none of it was averaged.
        bytes_in: Total size of the accepted updates.
        norms: Client id -> L2 norm of its delta from the reference (global) adapter, before
            any clipping; empty when no reference was given.
        clipped: Client ids whose delta was scaled down to ``clip_update_norm``.
        shares: Client id -> its share of the average (weights summing to 1).
        payloads: Client id -> the accepted bytes (for the run record), when kept.
        weight_clipped: Client id -> the weight it was averaged with, for every client whose
            weight ``max_share`` lowered (its claimed weight is its ``num_examples``).
    """

    state: dict[str, torch.Tensor] | None
    accepted: list[tuple[str, PayloadMeta]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    bytes_in: int = 0
    norms: dict[str, float] = field(default_factory=dict)
    clipped: list[str] = field(default_factory=list)
    shares: dict[str, float] = field(default_factory=dict)
    payloads: dict[str, bytes] = field(default_factory=dict)
    weight_clipped: dict[str, float] = field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        """Total training examples behind the accepted updates."""
        return sum(m.num_examples for _, m in self.accepted)


def fold_updates(
    updates: Sequence[Incoming],
    spec: UpdateSpec,
    weighting: Weighting = "samples",
    min_clients: int = 1,
    *,
    reference: Mapping[str, torch.Tensor] | None = None,
    clip_update_norm: float | None = None,
    robust: Robust = "none",
    trim_ratio: float = 0.2,
    accumulator: WeightedMean | DPSum | None = None,
    keep_bytes: bool = False,
    max_update_norm: float | None = None,
    max_share: float | None = None,
) -> RoundOutcome:
    """Validate each update once and fold the valid ones into the round's average.

    A client id that appears in more than one update is refused in all of them (which one is
    genuine cannot be told). Every other update is parsed, validated, (clipped,) added, and
    dropped, except with ``robust`` ``trimmed_mean`` or ``median``, which are coordinate-wise
    and keep every valid update of the round in memory.

    Args:
        updates: The round's updates.
        spec: What every update must match.
        weighting: ``samples`` (w_i = num_examples) or ``uniform`` (w_i = 1); ignored by the
            robust rules, which are unweighted.
        min_clients: Fewest valid updates for the round to produce a global adapter.
        reference: The global adapter the clients started from; needed for ``clip_update_norm``
            and used to record each update's delta norm.
        clip_update_norm: Scale each delta from ``reference`` down to this L2 norm.
        robust: ``none`` (weighted mean), ``trimmed_mean`` or ``median`` (coordinate-wise).
        trim_ratio: Share cut from each end by ``trimmed_mean``.
        accumulator: Where valid updates are added (default: a fresh :class:`WeightedMean`;
            a :class:`~lorafed.server.privacy.DPSum` for client-level DP, with uniform weights).
        keep_bytes: Keep each accepted update's bytes in the outcome (for the run record).
        max_update_norm: Reject an update whose delta from ``reference`` has an L2 norm above
            this (an absolute bound, checked before any clipping; a non-finite norm is always
            above it). Needs ``reference``.
        max_share: No client's share of a weighted mean may exceed this, in (0, 1]: the
            heaviest weights are lowered to the one level c at which each is ``max_share`` of
            the total (recorded in ``weight_clipped``); when fewer than ``1 / max_share``
            clients are valid, every weight becomes equal. It applies to the default
            :class:`WeightedMean` with ``robust="none"`` (the robust rules are unweighted) and
            keeps that round's valid updates in memory until the weights are known.

    Returns:
        The outcome; ``state`` is ``None`` when fewer than ``min_clients`` updates were valid.

    Raises:
        AggregationError: An unknown ``robust`` rule, ``clip_update_norm`` or ``max_update_norm``
            without a ``reference``, a ``max_share`` outside (0, 1], or an average that is not
            finite (nothing is published then).
    """
    if robust not in typing.get_args(Robust):
        raise AggregationError(f"robust: expected one of {typing.get_args(Robust)}, got {robust!r}")
    if clip_update_norm is not None and reference is None:
        raise AggregationError("clip_update_norm needs the reference (global) adapter the clients started from")
    if max_update_norm is not None and reference is None:
        raise AggregationError("max_update_norm needs the reference (global) adapter the clients started from")
    if max_update_norm is not None and not max_update_norm > 0:
        raise AggregationError(f"max_update_norm: expected a number > 0, got {max_update_norm!r}")
    if max_share is not None and not 0 < max_share <= 1:
        raise AggregationError(f"max_share: expected a number in (0, 1], got {max_share!r}")
    defer = max_share is not None and robust == "none" and accumulator is None
    out = RoundOutcome(state=None)
    owners: dict[str, list[str]] = {}
    readable: list[tuple[Incoming, bytes, PayloadHeader]] = []
    for up in updates:
        try:
            data = up.read()
            head = header_from_bytes(data, up.source)
        except PayloadError as exc:
            out.rejected.append((up.source, str(exc)))
            continue
        except _UNEXPECTED as exc:  # a hostile file must never end the federation
            out.rejected.append((up.source, _unexpected(up.source, exc)))
            continue
        owners.setdefault(head.meta.client_id, []).append(up.source)
        readable.append((up, data if up.data is not None else b"", head))
    acc = accumulator if accumulator is not None else WeightedMean()
    kept: list[Mapping[str, torch.Tensor]] = []
    weights: dict[str, float] = {}
    for up, data, head in readable:
        cid = head.meta.client_id
        if len(owners[cid]) > 1:
            out.rejected.append(
                (
                    up.source,
                    f"update from client {cid!r} ({up.source}) rejected: client_id: expected one update per round, "
                    f"received {len(owners[cid])}",
                )
            )
            continue
        try:
            raw = data or up.read()  # a file is read again only here, one at a time
            payload = payload_with_header(raw, head, up.source)
            validate_update(payload, spec, up.source)
            tensors = _fold_one(payload, reference, clip_update_norm, out)
            if max_update_norm is not None and not out.norms[cid] <= max_update_norm:
                out.rejected.append(
                    (
                        up.source,
                        f"update from client {cid!r} ({up.source}) rejected: update norm: expected an L2 norm of "
                        f"the delta from the global adapter <= {max_update_norm:g} (max_update_norm), "
                        f"received {out.norms[cid]:.6g}",
                    )
                )
                continue
        except (PayloadError, PayloadValidationError) as exc:
            out.rejected.append((up.source, str(exc)))
            continue
        except _UNEXPECTED as exc:
            out.rejected.append((up.source, _unexpected(up.source, exc)))
            continue
        if defer:
            weights[cid] = update_weight(payload.meta, weighting)
            kept.append(tensors)
        elif robust == "none":
            weights[cid] = update_weight(payload.meta, weighting)
            acc.add(tensors, weights[cid])
        else:
            weights[cid] = 1.0
            kept.append(tensors)
        out.accepted.append((up.source, payload.meta))
        out.bytes_in += payload.nbytes
        if keep_bytes:
            out.payloads[cid] = bytes(raw)
    if defer:
        capped = cap_shares(weights, float(max_share or 1.0))
        out.weight_clipped = {c: w for c, w in capped.items() if w < weights[c]}
        weights = capped
        for tensors, w in zip(kept, weights.values(), strict=True):
            acc.add(tensors, w)
        kept = []
    total = sum(weights.values())
    out.shares = {c: w / total for c, w in weights.items()} if total > 0 else {}
    if len(out.accepted) >= min_clients and out.accepted:
        if robust == "trimmed_mean":
            out.state = trimmed_mean(kept, trim_ratio)
        elif robust == "median":
            out.state = coordinate_median(kept)
        else:
            out.state = acc.result()
        require_finite(out.state, f"round average ({robust if robust != 'none' else 'weighted mean'})")
    return out


#: Exceptions a malformed payload could still raise past the named checks (a bug in lorafed);
#: the server step records them as a rejection of that update instead of ending the federation.
_UNEXPECTED = (ValueError, TypeError, KeyError, IndexError, OverflowError, RuntimeError, RecursionError, MemoryError)


def _unexpected(source: str, exc: BaseException) -> str:
    """The rejection reason of an update that raised something other than a named error."""
    return f"{source}: unreadable update, refused ({type(exc).__name__}: {str(exc)[:200]}; please report this)"


def cap_shares(weights: Mapping[str, float], max_share: float) -> dict[str, float]:
    """Lower the heaviest weights so that no share exceeds ``max_share`` (order kept).

    Water-filling: with the weights sorted down, the first ``k`` are set to one level
    ``c = s R / (1 - k s)`` (``R``: the sum of the others), the smallest ``k`` for which no other
    weight is above ``c``; then each of the ``k`` has share exactly ``s`` and the others keep
    their relative weights. If no such ``k`` exists (fewer than ``1 / s`` weights), every weight
    becomes the smallest one: equal shares, the closest to the bound that can be had.

    Args:
        weights: Client id -> weight (> 0).
        max_share: The bound s, in (0, 1].

    Returns:
        Client id -> capped weight.
    """
    order = sorted(weights, key=lambda c: weights[c], reverse=True)
    values = [weights[c] for c in order]
    for k in range(len(values)):
        if k * max_share >= 1:
            break
        rest = sum(values[k:])
        level = max_share * rest / (1 - k * max_share)
        if values[k] <= level * (1 + 1e-12):
            top = set(order[:k])
            return {c: level if c in top else w for c, w in weights.items()}
    low = min(values, default=0.0)
    return {c: low for c in weights}


def _fold_one(
    payload: Payload,
    reference: Mapping[str, torch.Tensor] | None,
    clip_update_norm: float | None,
    out: RoundOutcome,
) -> Mapping[str, torch.Tensor]:
    """One valid update's fp32 tensors, its delta norm recorded and clipped if asked."""
    tensors: Mapping[str, torch.Tensor] = payload.decoded()
    cid = payload.meta.client_id
    if reference is not None:
        out.norms[cid] = delta_norm(tensors, reference)
        if clip_update_norm is not None:
            tensors, norm = clip_update(tensors, reference, clip_update_norm)
            if norm > clip_update_norm:
                out.clipped.append(cid)
    return tensors


def aggregate_files(
    paths: Sequence[str | Path], spec: UpdateSpec, weighting: Weighting = "samples", min_clients: int = 1, **kwargs: Any
) -> RoundOutcome:
    """:func:`fold_updates` over update files (each read when it is folded in)."""
    return fold_updates([Incoming.from_file(p) for p in paths], spec, weighting, min_clients, **kwargs)


def update_weight(meta: PayloadMeta, weighting: Weighting) -> float:
    """The FedAvg weight of an update: n_i for ``samples``, 1 for ``uniform``."""
    return float(meta.num_examples) if weighting == "samples" else 1.0


def require_enough(outcome: RoundOutcome, min_clients: int, round_: int) -> Mapping[str, torch.Tensor]:
    """Return the new global state, or raise naming the rejected updates when too few were valid.

    Raises:
        AggregationError: Fewer than ``min_clients`` valid updates.
    """
    if outcome.state is None:
        reasons = "; ".join(r for _, r in outcome.rejected) or "no updates received"
        raise AggregationError(
            f"round {round_}: {len(outcome.accepted)} valid update(s), fewer than min_clients={min_clients}; "
            f"nothing was written. Rejected: {reasons}"
        )
    return outcome.state


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
        return merge_round(global_state, averaged), None
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
    """

    state: dict[str, torch.Tensor] | None
    outcome: RoundOutcome
    privacy: dict[str, Any] = field(default_factory=dict)


class RoundPolicy:
    """Client selection and the server step of one federation.

    Args:
        fcfg: The federation settings; besides the fields it always reads, the optional
            ``max_update_norm`` (reject an update whose delta from the global adapter has a larger
            L2 norm) and ``max_client_share`` (no client's share of the mean above it), both
            ``None`` (off) when the config does not have them (see :func:`fold_updates`).
        num_clients: N, the clients that could be asked (partitions, nodes or silos).
        seed: The run seed (client sampling).
    """

    def __init__(self, fcfg: FederationConfig, num_clients: int, seed: int) -> None:
        self.fcfg = fcfg
        self.num_clients = num_clients
        self.seed = seed
        self.server_opt: ServerOptState | None = None
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
        engine refuses an update that claims more examples than the cap.

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
        spec = dataclasses.replace(spec, max_num_examples=f.max_num_examples)
        need = self.min_valid(len(updates) if asked is None else asked)
        bound = self.update_bound(reference)
        if self.dp is None:
            outcome = fold_updates(
                updates,
                spec,
                f.weighting,
                need,
                reference=reference,
                clip_update_norm=f.clip_update_norm,
                robust=f.robust,
                trim_ratio=f.trim_ratio,
                keep_bytes=keep_bytes,
                max_update_norm=bound,
                max_share=self.max_client_share,
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
            )
        if outcome.state is None:
            return RoundResult(None, outcome)
        state, opt = next_global(reference, outcome.state, f, self.server_opt)
        require_finite(state, f"round {round_}: the next global adapter")
        self.server_opt = opt
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

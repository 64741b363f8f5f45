"""Folding a round's updates: parse and validate each once, refuse the invalid with a reason, average the rest.

The attack surface of the server: every update here comes from a party the server does not control.
Each one either becomes part of the weighted mean or is refused with a named reason; one bad update
never stops the others. :mod:`lorafed.server.step` runs it inside a federation's round.

Why one module over 300 lines: every check an untrusted update goes through sits in one
readable path (parse, duplicate ids, validation, norm bound, claimed weight, direction, weight
earned by agreement, share cap, finite result), so a reviewer sees the whole attack surface of
the server at once. The policy on claimed weights (``num_examples``) is :mod:`lorafed.server.claims`.

With a key registry (``verifier``), an update counts only when its detached Ed25519 signature
verifies for the client id its header claims (:mod:`lorafed.wire.sign`); the signature is checked
before anything else, so an unsigned or forged update can neither be averaged nor get the genuine
client's update refused as a duplicate. Without one, the header's client id is taken on trust.
"""

from __future__ import annotations

import hashlib
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorafed.errors import AggregationError, PayloadError, PayloadValidationError, SignatureError
from lorafed.server.aggregate import WeightedMean, Weighting, require_finite
from lorafed.server.claims import Lowered, OverRatio, above_typical, check_claims, declares_noise, unearned_weights
from lorafed.server.privacy import DPSum
from lorafed.server.robust import Robust, clip_update, coordinate_median, delta_norm, trimmed_mean
from lorafed.server.validate import UpdateSpec, validate_update
from lorafed.wire.payload import Payload, PayloadMeta
from lorafed.wire.reader import PayloadHeader, header_from_bytes, payload_with_header
from lorafed.wire.sign import read_signature, verify_payload

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


#: ``(tensors, lora config) ->`` an update's dense changes (clients of other LoRA ranks).
Densify = Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class Incoming:
    """One update as it reached the server: its bytes, or the file holding them.

    Attributes:
        source: Where it came from, for messages (a file path, ``node-7``, a drop name).
        data: The payload bytes (``None`` when ``path`` is given).
        path: A payload file, read when the update is folded in (memory stays flat in the
            number of files).
        signature: The sender's detached Ed25519 signature of the payload bytes (see
            :mod:`lorafed.wire.sign`); ``None``: none came with it, or, with ``path``, the
            ``<path>.sig`` file beside it is read when needed.
        header: The header of ``data`` as the transport already parsed it (a file drop reads it
            to count clients), so it is not parsed twice; used only when ``data`` starts with
            its bytes.
    """

    source: str
    data: bytes | None = None
    path: Path | None = None
    signature: bytes | None = None
    header: PayloadHeader | None = None

    def read_signature(self) -> bytes | None:
        """The signature that came with the payload (for a file: its ``.sig`` file), or ``None``.

        Raises:
            SignatureError: The ``.sig`` file is malformed or unreadable.
        """
        if self.signature is not None or self.path is None:
            return self.signature
        return read_signature(self.path)

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
        verified: Client ids whose signature verified (empty without a verifier).
        signatures: Client id -> the accepted update's signature (for the run record), when kept.
        claims: Client id -> its ``num_examples`` as accepted (after ``max_examples_growth`` and,
            under ``over_ratio: cap``, the ratio bound; before ``trust_weight_above`` and
            ``max_share``), for every accepted update: what the server pins as the client's claim
            when it first accepts one.
        lowered: Client id -> its cosine and its weight before and after, for every client whose
            weight above the typical was not earned by agreement (``trust_weight_above``).
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
    verified: list[str] = field(default_factory=list)
    signatures: dict[str, bytes] = field(default_factory=dict)
    claims: dict[str, float] = field(default_factory=dict)
    lowered: dict[str, Lowered] = field(default_factory=dict)

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
    verifier: Mapping[str, Ed25519PublicKey] | None = None,
    min_cosine: float | None = None,
    max_examples_ratio: float | None = None,
    over_ratio: OverRatio = "refuse",
    max_examples_growth: float | None = None,
    known_claims: Mapping[str, float] | None = None,
    dense: Densify | None = None,
    trust_weight_above: float | None = None,
    trust_min_cosine: float = 0.0,
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
        verifier: Client id -> public key (a key registry's clients): each update must carry a
            signature of its bytes that verifies with the key of the client id its header claims,
            else it is refused (missing signature, unknown client id, bad signature) before the
            duplicate check. A byte-identical copy of an update already received is refused as a
            copy, without refusing the original. ``None``: client ids are taken on trust.
        min_cosine: With at least 3 valid updates and a ``reference``, refuse an update whose delta
            points against the round's consensus: its cosine with the coordinate-wise median of
            the round's deltas is below this (a sign-flipped update has about -1 x an honest
            one's). Keeps the round's valid updates in memory.
        max_examples_ratio: With ``samples`` weighting, a claim above this multiple of the median
            claim of the *other* clients (this round's valid updates and ``known_claims`` of
            clients absent this round; at least 2 of them) is implausible (see
            :mod:`lorafed.server.claims`). Natural partitions stay under it (the clothing
            departments: Tops / median of the other five = 6.1).
        over_ratio: ``refuse`` an implausible claim with its reason (not averaged at all), or
            ``cap`` it: averaged as if it claimed the bound (recorded in ``weight_clipped``).
        max_examples_growth: With ``samples`` weighting, a claim above this multiple of the
            client's pinned claim in ``known_claims`` is capped to it (recorded in ``weight_clipped``).
        known_claims: Client id -> the claim pinned when the server first accepted one of its
            updates in this run (earlier rounds).
        dense: Clients of different LoRA ranks (``federation.hetero_ranks``): ``(tensors, lora) ->``
            the dense changes the server averages (:class:`lorafed.server.hetero.DenseUpdates`),
            applied to each update as it is folded in, so the mean, the norms, clipping and the
            robust rules work on those; ``reference`` must be dense too.
        trust_weight_above: With ``samples`` weighting and a ``reference``, a weight (the claim
            accepted above) over this multiple of the median weight of the round's other valid
            updates must be earned by agreement: if the update's delta has a cosine below
            ``trust_min_cosine`` with the others' weighted mean delta, its weight is lowered to
            that median (recorded in ``lowered`` and ``weight_clipped``; see
            :func:`lorafed.server.claims.unearned_weights`; an update whose header declares
            record-DP noise is lowered only beyond the cosine chance explains). ``None`` or 0: off.
        trust_min_cosine: The least cosine that earns a weight above the typical, in [-1, 1].

    Returns:
        The outcome; ``state`` is ``None`` when fewer than ``min_clients`` updates were valid.

    Raises:
        AggregationError: An unknown ``robust`` rule or ``over_ratio``, ``clip_update_norm`` or
            ``max_update_norm`` without a ``reference``, a ``max_share`` outside (0, 1], a
            ``trust_weight_above`` below 1 (other than 0) or a ``trust_min_cosine`` outside
            [-1, 1], or an average that is not finite (nothing is published then).
    """
    if robust not in typing.get_args(Robust):
        raise AggregationError(f"robust: expected one of {typing.get_args(Robust)}, got {robust!r}")
    if clip_update_norm is not None and reference is None:
        raise AggregationError("clip_update_norm needs the reference (global) adapter the clients started from")
    if max_update_norm is not None and reference is None:
        raise AggregationError("max_update_norm needs the reference (global) adapter the clients started from")
    if max_update_norm is not None and not max_update_norm > 0:
        raise AggregationError(f"max_update_norm: expected a number > 0, got {max_update_norm!r}")
    if over_ratio not in typing.get_args(OverRatio):
        raise AggregationError(f"over_ratio: expected one of {typing.get_args(OverRatio)}, got {over_ratio!r}")
    if max_share is not None and not 0 < max_share <= 1:
        raise AggregationError(f"max_share: expected a number in (0, 1], got {max_share!r}")
    if trust_weight_above is not None and trust_weight_above != 0 and not trust_weight_above >= 1:
        raise AggregationError(f"trust_weight_above: expected 0, None or a number >= 1, got {trust_weight_above!r}")
    if not -1 <= trust_min_cosine <= 1:
        raise AggregationError(f"trust_min_cosine: expected a number in [-1, 1], got {trust_min_cosine!r}")
    trust = bool(trust_weight_above) and weighting == "samples" and reference is not None
    claim_checks = max_examples_ratio is not None or max_examples_growth is not None
    weighted = robust == "none" and accumulator is None
    defer = weighted and (max_share is not None or min_cosine is not None or claim_checks or trust)
    out = RoundOutcome(state=None)
    owners: dict[str, list[str]] = {}
    readable: list[tuple[Incoming, bytes, PayloadHeader]] = []
    signed: dict[str, tuple[bytes, bytes]] = {}  # client id -> (signature, sha256) of its verified update
    for up in updates:
        try:
            data = up.read()
            head = up.header
            if head is None or up.data is None or data[: len(head.raw)] != head.raw:
                head = header_from_bytes(data, up.source)
            if verifier is not None:
                sig = _verify(up, data, head.meta.client_id, verifier)
                digest = hashlib.sha256(data).digest()
                cid = head.meta.client_id
                if cid in signed and signed[cid] == (sig, digest):
                    out.rejected.append(
                        (up.source, f"{up.source}: a copy of client {cid!r}'s update already received; counted once")
                    )
                    continue
                signed.setdefault(cid, (sig, digest))
        except (PayloadError, SignatureError) as exc:
            out.rejected.append((up.source, str(exc)))
            continue
        except _UNEXPECTED as exc:  # a hostile file must never end the federation
            out.rejected.append((up.source, _unexpected(up.source, exc)))
            continue
        owners.setdefault(head.meta.client_id, []).append(up.source)
        readable.append((up, data if up.data is not None else b"", head))
    acc = accumulator if accumulator is not None else WeightedMean()
    kept: list[Mapping[str, torch.Tensor]] = []
    kept_ids: list[tuple[str, str, int]] = []  # (client id, source, bytes) of each kept update, when deferred
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
            tensors = _fold_one(payload, reference, clip_update_norm, out, dense)
            if max_update_norm is not None and not out.norms[cid] <= max_update_norm:
                out.rejected.append(
                    (
                        up.source,
                        f"update from client {cid!r} ({up.source}) rejected: update norm: expected an L2 norm of "
                        f"the delta from the global adapter <= {max_update_norm:g} (max_update_ratio x the "
                        f"global's norm, or max_update_norm), "
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
            kept_ids.append((cid, up.source, payload.nbytes))
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
        if verifier is not None:
            out.verified.append(cid)
            if keep_bytes:
                out.signatures[cid] = signed[cid][0]
    claimed = dict(weights)  # the weights as claimed, before any check lowered one
    if defer and claim_checks and weighting == "samples":
        check = check_claims(weights, known_claims, max_examples_ratio, max_examples_growth, over_ratio)
        kept, kept_ids = _refuse(kept, kept_ids, check.refused, weights, out)
        weights = check.weights
    if defer and min_cosine is not None and reference is not None and len(kept) >= 3:
        kept, kept_ids = _drop_opposed(kept, kept_ids, reference, min_cosine, weights, out)
    out.claims = {m.client_id: float(m.num_examples) for _, m in out.accepted}
    if defer:
        out.claims.update(weights if weighting == "samples" else {})
        if trust and reference is not None and above_typical(weights, float(trust_weight_above or 0)):
            rows = _deltas(kept, reference)
            deltas = {cid: row for (cid, _, _), row in zip(kept_ids, rows, strict=True)}
            noisy = {m.client_id for _, m in out.accepted if declares_noise(m.metrics)}
            out.lowered = unearned_weights(weights, deltas, float(trust_weight_above or 0), trust_min_cosine, noisy)
            weights.update({cid: low.weight for cid, low in out.lowered.items()})
        capped = cap_shares(weights, float(max_share or 1.0))
        out.weight_clipped = {c: w for c, w in capped.items() if w < claimed[c]}
        weights = capped
        for tensors, (cid, _, _) in zip(kept, kept_ids, strict=True):
            acc.add(tensors, weights[cid])
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


def _drop_opposed(
    kept: list[Mapping[str, torch.Tensor]],
    ids: list[tuple[str, str, int]],
    reference: Mapping[str, torch.Tensor],
    min_cosine: float,
    weights: dict[str, float],
    out: RoundOutcome,
) -> tuple[list[Mapping[str, torch.Tensor]], list[tuple[str, str, int]]]:
    """Refuse the updates whose delta has a cosine below ``min_cosine`` with the round's median delta.

    The coordinate-wise median of the deltas is the consensus a minority cannot move far, so an
    update that reverses it (a sign flip) stands out whatever its norm. Returns the updates kept
    and their ids; ``weights`` and ``out`` lose the refused ones.
    """
    deltas = _deltas(kept, reference)
    median = deltas.median(dim=0).values
    m_norm = float(median.norm())
    if m_norm == 0.0:
        return kept, ids
    cosines = (deltas @ median) / (deltas.norm(dim=1).clamp_min(1e-30) * m_norm)
    reasons = {
        cid: f"direction: expected a cosine with the round's median update >= {min_cosine:g} (min_update_cosine), "
        f"received {c:.3f}"
        for (cid, _, _), c in zip(ids, cosines.tolist(), strict=True)
        if c < min_cosine
    }
    return _refuse(kept, ids, reasons, weights, out)


def _deltas(kept: Sequence[Mapping[str, torch.Tensor]], reference: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The updates' deltas from ``reference`` over the tensors they send (LoRA factors, head), one fp64 row each."""
    keys = sorted(reference)
    return torch.stack(
        [torch.cat([(t[k].double() - reference[k].double()).flatten() for k in keys if k in t]) for t in kept]
    )


def _refuse(
    kept: list[Mapping[str, torch.Tensor]],
    ids: list[tuple[str, str, int]],
    reasons: Mapping[str, str],
    weights: dict[str, float],
    out: RoundOutcome,
) -> tuple[list[Mapping[str, torch.Tensor]], list[tuple[str, str, int]]]:
    """Take back updates already accepted into a deferred round (``reasons``: client id -> why).

    Returns the updates kept and their ids; ``weights`` and ``out`` (accepted, bytes, kept
    payloads and signatures) lose the refused ones, which join ``out.rejected``.
    """
    if not reasons:
        return kept, ids
    for cid, source, nbytes in ids:
        if cid in reasons:
            out.bytes_in -= nbytes
            out.rejected.append((source, f"update from client {cid!r} ({source}) rejected: {reasons[cid]}"))
            weights.pop(cid, None)
            out.payloads.pop(cid, None)
            out.signatures.pop(cid, None)
            if cid in out.verified:
                out.verified.remove(cid)
    out.accepted = [(s, m) for s, m in out.accepted if m.client_id not in reasons]
    pairs = [(t, i) for t, i in zip(kept, ids, strict=True) if i[0] not in reasons]
    return [t for t, _ in pairs], [i for _, i in pairs]


#: Exceptions a malformed payload could still raise past the named checks (a bug in lorafed);
#: the server step records them as a rejection of that update instead of ending the federation.
_UNEXPECTED = (ValueError, TypeError, KeyError, IndexError, OverflowError, RuntimeError, RecursionError, MemoryError)


def _verify(up: Incoming, data: bytes, cid: str, verifier: Mapping[str, Ed25519PublicKey]) -> bytes:
    """The update's signature, once it verifies for the client id ``cid`` its header claims.

    Raises:
        SignatureError: Missing signature, unknown client id, or a signature that does not verify.
    """
    sig = up.read_signature()
    key = verifier.get(cid)
    if key is None:
        raise SignatureError(f"unknown client id: {cid[:128]!r} is not in the key registry; update refused", up.source)
    verify_payload(data, sig, key, cid, up.source)
    assert sig is not None  # verify_payload refuses a missing one
    return sig


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
    dense: Densify | None = None,
) -> Mapping[str, torch.Tensor]:
    """One valid update's fp32 tensors (``dense``: its dense changes), its delta norm recorded and clipped if asked."""
    tensors: Mapping[str, torch.Tensor] = payload.decoded()
    if dense is not None:
        tensors = dense(tensors, payload.meta.lora)
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

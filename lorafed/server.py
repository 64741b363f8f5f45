"""The server's round: read updates one at a time, validate each, and fold the valid ones in.

This is the one place where files become a global adapter, shared by the simulator, the
``lorafed aggregate`` command and the distributed engines. Only one update is in memory at
a time (plus the fp32 accumulator), so memory stays flat in the number of clients.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafed.aggregate import WeightedMean
from lorafed.config import FederationConfig, Robust, Weighting
from lorafed.errors import AggregationError, PayloadError, PayloadValidationError
from lorafed.lora_modes import merge_round
from lorafed.payload import PayloadHeader, PayloadMeta, load_payload, read_header
from lorafed.privacy import DPSum
from lorafed.robust import clip_update, coordinate_median, delta_norm, trimmed_mean
from lorafed.server_opt import ServerOptSettings, ServerOptState, server_step
from lorafed.validate import UpdateSpec, validate_update


@dataclass
class RoundOutcome:
    """What a round's aggregation produced.

    Attributes:
        state: The new global adapter tensors (fp32), or ``None`` if too few updates were valid.
        accepted: ``(source, header)`` of every update averaged.
        rejected: ``(source, reason)`` of every update refused; none of it was averaged.
        bytes_in: Total size of the accepted update files.
        norms: Client id -> L2 norm of its delta from the reference (global) adapter, before
            any clipping; empty when no reference was given.
        clipped: Client ids whose delta was scaled down to ``clip_update_norm``.
    """

    state: dict[str, torch.Tensor] | None
    accepted: list[tuple[str, PayloadMeta]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    bytes_in: int = 0
    norms: dict[str, float] = field(default_factory=dict)
    clipped: list[str] = field(default_factory=list)

    @property
    def num_examples(self) -> int:
        """Total training examples behind the accepted updates."""
        return sum(m.num_examples for _, m in self.accepted)


def aggregate_files(
    paths: Sequence[str | Path],
    spec: UpdateSpec,
    weighting: Weighting = "samples",
    min_clients: int = 1,
    *,
    reference: Mapping[str, torch.Tensor] | None = None,
    clip_update_norm: float | None = None,
    robust: Robust = "none",
    trim_ratio: float = 0.2,
    accumulator: WeightedMean | DPSum | None = None,
) -> RoundOutcome:
    """Validate and average a round's update files.

    A client id that appears in more than one file is refused in all of them (which one is
    genuine cannot be told). Every other file is loaded, validated, (clipped,) added, and
    dropped, so memory stays flat, except with ``robust`` ``trimmed_mean`` or ``median``, which
    are coordinate-wise and keep every valid update of the round in memory.

    Args:
        paths: The update files.
        spec: What every update must match.
        weighting: ``samples`` (w_i = num_examples) or ``uniform`` (w_i = 1); ignored by the
            robust rules, which are unweighted.
        min_clients: Fewest valid updates for the round to produce a global adapter.
        reference: The global adapter the clients started from; needed for ``clip_update_norm``
            and used to record each update's delta norm.
        clip_update_norm: Scale each delta from ``reference`` down to this L2 norm (see
            :func:`lorafed.robust.clip_update`).
        robust: ``none`` (weighted mean), ``trimmed_mean`` or ``median`` (coordinate-wise).
        trim_ratio: Share cut from each end by ``trimmed_mean``.
        accumulator: Where valid updates are added (default: a fresh :class:`WeightedMean`;
            a :class:`~lorafed.privacy.DPSum` for client-level DP, with ``weighting="uniform"``).

    Returns:
        The outcome; ``state`` is ``None`` when fewer than ``min_clients`` updates were valid.

    Raises:
        AggregationError: ``clip_update_norm`` without a ``reference``.
    """
    if robust not in typing.get_args(Robust):
        raise AggregationError(f"robust: expected one of {typing.get_args(Robust)}, got {robust!r}")
    if clip_update_norm is not None and reference is None:
        raise AggregationError("clip_update_norm needs the reference (global) adapter the clients started from")
    out = RoundOutcome(state=None)
    owners: dict[str, list[str]] = {}
    readable: list[tuple[str, PayloadHeader]] = []
    for p in map(str, paths):
        try:
            head = read_header(p)
            owners.setdefault(head.meta.client_id, []).append(p)
            readable.append((p, head))
        except PayloadError as exc:
            out.rejected.append((p, str(exc)))
    dupes = {p for files in owners.values() if len(files) > 1 for p in files}
    acc = accumulator if accumulator is not None else WeightedMean()
    kept: list[Mapping[str, torch.Tensor]] = []
    for p, head in readable:
        if p in dupes:
            cid = next(c for c, files in owners.items() if p in files)
            out.rejected.append(
                (
                    p,
                    f"update from client {cid!r} ({p}) rejected: client_id: expected one update per round, "
                    f"received {len(owners[cid])}",
                )
            )
            continue
        try:
            payload = load_payload(p, header=head)
            validate_update(payload, spec, p)
        except (PayloadError, PayloadValidationError) as exc:
            out.rejected.append((p, str(exc)))
            continue
        tensors: Mapping[str, torch.Tensor] = payload.decoded()
        cid = payload.meta.client_id
        if reference is not None:
            out.norms[cid] = delta_norm(tensors, reference)
            if clip_update_norm is not None:
                tensors, norm = clip_update(tensors, reference, clip_update_norm)
                if norm > clip_update_norm:
                    out.clipped.append(cid)
        if robust == "none":
            acc.add(tensors, update_weight(payload.meta, weighting))
        else:
            kept.append(tensors)
        out.accepted.append((p, payload.meta))
        out.bytes_in += payload.nbytes
    if len(out.accepted) >= min_clients and out.accepted:
        if robust == "trimmed_mean":
            out.state = trimmed_mean(kept, trim_ratio)
        elif robust == "median":
            out.state = coordinate_median(kept)
        else:  # "none", checked above
            out.state = acc.result()
    return out


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

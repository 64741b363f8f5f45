"""The server's round: read updates one at a time, validate each, and fold the valid ones in.

This is the one place where files become a global adapter, shared by the simulator, the
``lorafed aggregate`` command and the distributed engines. Only one update is in memory at
a time (plus the fp32 accumulator), so memory stays flat in the number of clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafed.aggregate import WeightedMean
from lorafed.config import Weighting
from lorafed.errors import AggregationError, PayloadError, PayloadValidationError
from lorafed.payload import PayloadHeader, PayloadMeta, load_payload, read_header
from lorafed.validate import UpdateSpec, validate_update


@dataclass
class RoundOutcome:
    """What a round's aggregation produced.

    Attributes:
        state: The new global adapter tensors (fp32), or ``None`` if too few updates were valid.
        accepted: ``(source, header)`` of every update averaged.
        rejected: ``(source, reason)`` of every update refused; none of it was averaged.
        bytes_in: Total size of the accepted update files.
    """

    state: dict[str, torch.Tensor] | None
    accepted: list[tuple[str, PayloadMeta]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    bytes_in: int = 0

    @property
    def num_examples(self) -> int:
        """Total training examples behind the accepted updates."""
        return sum(m.num_examples for _, m in self.accepted)


def aggregate_files(
    paths: Sequence[str | Path],
    spec: UpdateSpec,
    weighting: Weighting = "samples",
    min_clients: int = 1,
) -> RoundOutcome:
    """Validate and average a round's update files.

    A client id that appears in more than one file is refused in all of them (which one is
    genuine cannot be told). Every other file is loaded, validated, added, and dropped.

    Args:
        paths: The update files.
        spec: What every update must match.
        weighting: ``samples`` (w_i = num_examples) or ``uniform`` (w_i = 1).
        min_clients: Fewest valid updates for the round to produce a global adapter.

    Returns:
        The outcome; ``state`` is ``None`` when fewer than ``min_clients`` updates were valid.
    """
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
    acc = WeightedMean()
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
        acc.add(payload.decoded(), update_weight(payload.meta, weighting))
        out.accepted.append((p, payload.meta))
        out.bytes_in += payload.nbytes
    if acc.count >= min_clients:
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

"""The one round loop: choose -> dispatch -> aggregate -> publish -> record, for every engine.

An engine is a :class:`Transport`: it carries the global adapter to the chosen clients and brings
back their updates as bytes, with the clients that failed or timed out. Everything else is
here, once: client choice and the server step (:class:`~lorafed.server.step.RoundPolicy`),
retries (``federation.round_retries``), the per-round deadline (``federation.client_timeout_s``,
which each transport enforces in the way its medium allows), the weight cap, evaluation, and
the run record (:class:`~lorafed.engine.record.RunRecord`, one ``metrics.jsonl`` schema).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lorafed.config import FederationConfig
from lorafed.engine.record import RunRecord, metrics_row
from lorafed.errors import AggregationError
from lorafed.metrics import EvalResult
from lorafed.server.fold import Incoming
from lorafed.server.step import RoundPolicy, RoundResult
from lorafed.server.validate import UpdateSpec
from lorafed.wire.payload import ModelIdentity, payload_digest, payload_to_bytes
from lorafed.wire.sign import Signing, write_signature

logger = logging.getLogger(__name__)


@dataclass
class Dispatched:
    """What a transport brought back from one dispatch.

    Attributes:
        replies: ``(client index, update)`` of every update received; the index orders the
            updates (so every engine sums them in the same order); ``-1`` where the transport
            cannot tell (a file drop), then the source name orders them.
        failures: ``{"client", "reason"}`` of every client that raised, timed out or sent nothing.
    """

    replies: list[tuple[int, Incoming]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)


class Transport(Protocol):
    """How an engine reaches its clients for one round."""

    def dispatch(
        self, round_: int, clients: list[int], global_bytes: bytes, global_state: dict[str, torch.Tensor]
    ) -> Dispatched:
        """Have ``clients`` (indices) train round ``round_`` from the global adapter; collect the updates.

        A transport enforces ``federation.client_timeout_s`` as its medium allows: it drops a
        reply that came late and lists the client in ``failures``.
        """
        ...


StopFn = Callable[[int, dict[str, torch.Tensor], EvalResult | None], bool]
Evaluator = Callable[[dict[str, torch.Tensor]], EvalResult | None]
SpecFn = Callable[[int | None], UpdateSpec]


@dataclass
class Federated:
    """What the loop needs besides the transport.

    Attributes:
        fcfg: The federation settings.
        policy: Client choice and the server step.
        record: The run folder.
        identity: The federation identity (headers of the global adapters).
        spec: Round -> what that round's updates must match.
        client_ids: Names of the clients the policy chooses among, by index.
        evaluate: Scores a global adapter on the test rows, or ``None`` (no test rows here).
        signing: The server's signing set-up (key registry and server key), or ``None``: then
            each global adapter is published with its signature (``.sig`` beside it) and the
            policy's verifier should be the registry's clients.
    """

    fcfg: FederationConfig
    policy: RoundPolicy
    record: RunRecord
    identity: ModelIdentity
    spec: SpecFn
    client_ids: list[str]
    evaluate: Evaluator | None = None
    signing: Signing | None = None

    def score(self, state: dict[str, torch.Tensor]) -> EvalResult | None:
        return self.evaluate(state) if self.evaluate is not None else None


def publish(
    fed: Federated, r: int, state: dict[str, torch.Tensor], num_examples: int, parent: bytes | None = None
) -> bytes:
    """Write the global adapter after round ``r`` to the record, with its lineage; return its bytes.

    With :attr:`Federated.signing`, the server's signature is written beside it (``.sig``).
    """
    lineage: dict[str, Any] = {"run": fed.record.run_id}
    if parent is not None:
        lineage.update(parent_round=r - 1, parent=payload_digest(parent))
    meta = fed.identity.meta("server", r, max(num_examples, 1), kind="global", metrics=lineage)
    data = payload_to_bytes(state, meta)
    path = fed.record.write_global(r, data, fed.policy.server_opt, fed.policy.claims)
    if fed.signing is not None:
        write_signature(path, fed.signing.sign_global(data))
    return data


def start(fed: Federated, state: dict[str, torch.Tensor]) -> EvalResult | None:
    """Record round 0: the untrained adapter, published and scored."""
    t = time.perf_counter()
    data = publish(fed, 0, state, 1)
    scores = fed.score(state)
    fed.record.append(metrics_row(0, scores, global_bytes=len(data), seconds={"eval": time.perf_counter() - t}))
    if scores is not None:
        logger.info("round 0 (untrained): accuracy %.4f  macro-F1 %.4f", scores.accuracy, scores.macro_f1)
    return scores


def run_round(
    fed: Federated, transport: Transport, state: dict[str, torch.Tensor], r: int, global_bytes: bytes
) -> tuple[dict[str, torch.Tensor], bytes, EvalResult | None]:
    """One round through ``transport``; returns the new global adapter, its bytes and its scores.

    Clients that fail or time out are recorded in the row's ``failed`` list and nothing of
    theirs is averaged. With fewer valid updates than ``min_clients`` the round is dispatched
    again to the clients that failed, up to ``federation.round_retries`` times (same seeds, so
    the same tensors), then abandoned.

    Raises:
        AggregationError: Still too few valid updates after every retry.
    """
    f = fed.fcfg
    times = {"train": 0.0, "aggregate": 0.0, "eval": 0.0}
    chosen = fed.policy.choose(r)
    pending = list(chosen)
    received: list[tuple[int, Incoming]] = []
    failed: list[dict[str, Any]] = []
    attempts = f.round_retries + 1
    result: RoundResult | None = None
    attempt = 0
    for attempt in range(1, attempts + 1):
        t = time.perf_counter()
        got = transport.dispatch(r, pending, global_bytes, state)
        times["train"] += time.perf_counter() - t
        failed += [{**x, "attempt": attempt} for x in got.failures]
        for x in got.failures:
            logger.warning("round %d: client %s dropped (attempt %d): %s", r, x["client"], attempt, x["reason"])
        received += got.replies
        received.sort(key=lambda kv: (kv[0], kv[1].source))
        t = time.perf_counter()
        # A retry hands the server step every update received so far, so those of earlier attempts
        # are parsed and validated again: the claim and direction checks compare a round's updates
        # with each other, and keeping decoded tensors across attempts would hold the whole round
        # in memory (a file drop's). Validation costs milliseconds per update next to training.
        result = fed.policy.try_aggregate(
            [u for _, u in received], fed.spec(r), state, r, asked=len(chosen), keep_bytes=True
        )
        times["aggregate"] += time.perf_counter() - t
        if result.state is not None:
            break
        dropped = {x["client"] for x in got.failures}
        pending = [k for k in pending if k < len(fed.client_ids) and fed.client_ids[k] in dropped]
        if attempt < attempts and pending:
            logger.warning(
                "round %d: %d valid update(s) < min_clients=%d; retrying %d client(s)",
                r,
                len(result.outcome.accepted),
                f.min_clients,
                len(pending),
            )
        elif attempt < attempts:
            # Nothing to re-ask by index (a file drop): wait for more updates in another dispatch.
            pending = list(chosen)
    assert result is not None  # the loop runs at least once
    outcome = result.outcome
    for src, reason in outcome.rejected:
        logger.warning("round %d: rejected %s: %s", r, src, reason)
    for cid, low in outcome.lowered.items():
        logger.warning(
            "round %d: client %r averaged with weight %.6g (the median claim of the others), not its claimed %.6g: "
            "its update's cosine with the others' mean is %.3f, below federation.trust_min_cosine %g "
            "(federation.trust_weight_above); its share is %.4f",
            r,
            cid,
            low.weight,
            low.claimed,
            low.cosine,
            f.trust_min_cosine,
            outcome.shares.get(cid, 0.0),
        )
    for cid, weight in outcome.weight_clipped.items():
        if cid in outcome.lowered and weight == outcome.lowered[cid].weight:
            continue  # logged above
        logger.warning(
            "round %d: client %r averaged with weight %.6g, below its claimed num_examples (max_examples_growth, "
            "over_ratio: cap, trust_weight_above or max_client_share); its share is %.4f",
            r,
            cid,
            weight,
            outcome.shares.get(cid, 0.0),
        )
    if result.state is None:
        drop = "; ".join(f"{x['client']}: {x['reason']}" for x in failed) or "none"
        rej = "; ".join(reason for _, reason in outcome.rejected) or "none"
        raise AggregationError(
            f"round {r} abandoned after {attempt} attempt(s): {len(outcome.accepted)} valid update(s), fewer than "
            f"federation.min_clients={f.min_clients}. Failed clients: {drop}. Rejected updates: {rej}. "
            f"The run folder holds rounds 0..{r - 1}; fix the cause and resume."
        )
    new_state = result.state
    fed.record.write_updates(r, outcome.payloads)
    for cid, sig in outcome.signatures.items():  # verified ids are registry ids: safe file names
        write_signature(fed.record.out / "rounds" / f"r{r}" / f"{cid}.safetensors", sig)
    data = publish(fed, r, new_state, outcome.num_examples, parent=global_bytes)
    t = time.perf_counter()
    scores = fed.score(new_state)
    times["eval"] = time.perf_counter() - t
    losses = [(m.metrics.get("loss"), m.num_examples) for _, m in outcome.accepted]
    losses = [(float(v), n) for v, n in losses if isinstance(v, int | float)]
    row = metrics_row(
        r,
        scores,
        clients=[m.client_id for _, m in outcome.accepted],
        train_loss=sum(v * n for v, n in losses) / sum(n for _, n in losses) if losses else None,
        bytes_up=outcome.bytes_in,
        bytes_down=len(global_bytes) * len(chosen),
        global_bytes=len(data),
        shares={k: round(v, 6) for k, v in outcome.shares.items()},
        weight_lowered={
            cid: {"cosine": round(low.cosine, 6), "claimed": low.claimed, "weight": low.weight}
            for cid, low in outcome.lowered.items()
        },
        update_norms={k: round(v, 6) for k, v in outcome.norms.items()},
        clipped=outcome.clipped,
        rejected=[reason for _, reason in outcome.rejected],
        failed=failed,
        attempts=attempt,
        seconds=times,
        record_epsilon=_record_epsilon(outcome.accepted),
    )
    if result.privacy:
        row["privacy"] = result.privacy
    if fed.signing is not None:
        row["signed"] = list(outcome.verified)
    fed.record.append(row)
    if scores is not None:
        logger.info(
            "round %d: %d client(s), accuracy %.4f, macro-F1 %.4f",
            r,
            len(row["clients"]),
            scores.accuracy,
            scores.macro_f1,
        )
    else:
        logger.info("round %d: aggregated %d update(s)", r, len(row["clients"]))
    return new_state, data, scores


def _record_epsilon(accepted: list[tuple[str, Any]]) -> dict[str, float] | None:
    """Client id -> the record-level DP epsilon it has spent so far (from its header), or ``None``."""
    eps = {
        m.client_id: float(m.metrics["epsilon"])
        for _, m in accepted
        if isinstance(m.metrics.get("epsilon"), int | float) and not isinstance(m.metrics.get("epsilon"), bool)
    }
    return eps or None


def run_rounds(
    fed: Federated,
    transport: Transport,
    state: dict[str, torch.Tensor],
    first: int,
    last: int,
    progress: bool = False,
    stop: StopFn | None = None,
) -> tuple[dict[str, torch.Tensor], EvalResult | None]:
    """Rounds ``first``..``last`` (the global adapter of ``first - 1`` is on record).

    Args:
        fed: The federation's loop settings.
        transport: How rounds reach the clients.
        state: The global adapter after round ``first - 1``.
        first: The first round to run.
        last: The last round to run.
        progress: Show a progress bar over rounds (on a terminal only).
        stop: Called after each completed round with (round, global adapter, scores); a true
            answer ends the run there (e.g. early stopping on validation rows). The round is on
            record either way.

    Returns:
        The final global adapter and its scores (``None`` when no round ran or nothing scores).
    """
    from lorafed.progress import progress_bar

    global_bytes = fed.record.global_path(first - 1).read_bytes()
    scores: EvalResult | None = None
    for r in progress_bar(range(first, last + 1), desc="rounds", unit="round", enabled=progress):
        state, global_bytes, scores = run_round(fed, transport, state, r, global_bytes)
        if stop is not None and stop(r, state, scores):
            logger.info("round %d: stopping early", r)
            break
    return state, scores

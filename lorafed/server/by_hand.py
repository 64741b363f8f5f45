"""The server step run by hand on update files (``lorafed aggregate``), with every server setting.

A cross-silo server holds no federation in memory between rounds: each round it is given the
update files, the previous global adapter (or, in round 1, the config, whose seeded fresh
adapter every client started from) and the config's ``federation`` section. This module
rebuilds what the in-process server holds — the round's trusted spec, the reference adapter the
clients started from, the server optimizer's state — and runs the same
:meth:`~lorafed.server.step.RoundPolicy.try_aggregate` every engine runs, so robust rules,
update clipping, client-level DP, FFA/RoLoRA and server optimizers all apply.

The server optimizer's state travels beside the global adapter as
``<stem>.server_opt.safetensors`` (see :func:`server_opt_path`), and the clients' pinned
``num_examples`` claims as ``<stem>.claims.json`` (see :func:`claims_path` and
:mod:`lorafed.server.claims`), so the next round's server refuses or caps as a long-running one would.

With ``federation.signing.registry`` each update file must have its client's signature beside it
(``<update>.sig``, as ``lorafed client train`` writes it) and the new global adapter gets the
server's (``<out>.sig``, with ``federation.signing.server_key``); see :mod:`lorafed.wire.sign`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafed.config import RunConfig
from lorafed.errors import LorafedError
from lorafed.files import atomic_write_bytes
from lorafed.server.claims import load_claims, save_claims
from lorafed.server.fold import Incoming
from lorafed.server.server_opt import load_server_opt, save_server_opt
from lorafed.server.specs import federation_base, federation_labels, round_spec
from lorafed.server.step import RoundPolicy, RoundResult
from lorafed.server.validate import UpdateSpec
from lorafed.wire.payload import ModelIdentity, PayloadMeta, payload_to_bytes
from lorafed.wire.reader import load_payload
from lorafed.wire.sign import server_signing, write_signature


@dataclass(frozen=True)
class Start:
    """What the clients of a round started from.

    Attributes:
        identity: The federation's base fingerprint, LoRA config and labels.
        reference: The adapter the clients started from, every tensor, fp32.
        round: The round the updates belong to.
        source: Where ``reference`` came from (for messages).
        global_path: The previous global adapter, or ``None`` in round 1 from the config.
    """

    identity: ModelIdentity
    reference: dict[str, torch.Tensor]
    round: int
    source: str
    global_path: Path | None = None


def server_opt_path(adapter: str | Path) -> Path:
    """Where the server optimizer state of the global adapter ``adapter`` is kept (``X.safetensors`` ->
    ``X.server_opt.safetensors``)."""
    p = Path(adapter)
    return p.with_name(f"{p.stem}.server_opt.safetensors")


def claims_path(adapter: str | Path) -> Path:
    """Where the pinned claims of the global adapter ``adapter`` are kept (``X.safetensors`` -> ``X.claims.json``)."""
    p = Path(adapter)
    return p.with_name(f"{p.stem}.claims.json")


def start_from_global(path: str | Path, config: RunConfig | None = None, round_: int | None = None) -> Start:
    """The round after the global adapter at ``path`` (its header and tensors are trusted).

    Args:
        path: The previous global adapter.
        config: The federation's config, whose ``data.labels`` (if set) must match the adapter's.
        round_: The round of the updates (default: the adapter's round + 1).

    Raises:
        PayloadError: The file is not a readable lorafed payload.
        ConfigError: ``data.labels`` differs from the adapter's labels.
    """
    glob = load_payload(path)
    if config is not None:
        federation_labels(config, glob.meta, str(path))
    round_ = glob.meta.round + 1 if round_ is None else round_
    reference = {k: v.to(torch.float32) for k, v in glob.decoded().items()}
    return Start(ModelIdentity.of(glob.meta), reference, round_, str(path), Path(path))


def start_from_config(config: RunConfig, round_: int | None = None, source: str = "config") -> Start:
    """Round 1 of the federation ``config`` describes: the seeded fresh adapter every client starts from.

    Loads the base model in fp32 to fingerprint it and to build the adapter (``config.seed``).

    Raises:
        ConfigError: ``data.labels`` is not set.
        LorafedError: ``round_`` is not 1 (a later round needs the global adapter its clients started from).
        ModelError: The base model cannot be loaded.
    """
    round_ = 1 if round_ is None else round_
    if round_ != 1:
        raise LorafedError(
            f"round {round_}: without the previous global adapter only round 1 can be aggregated (its clients "
            "start from the seeded fresh adapter); pass --global global_r{N-1}.safetensors"
        )
    identity, reference = federation_base(config, federation_labels(config, None, source))
    return Start(identity, reference, round_, f"the fresh adapter seeded by {source}")


def start_spec(start: Start, config: RunConfig) -> UpdateSpec:
    """The spec of the round's updates: the tensors this round's clients send (FFA/RoLoRA send a subset)."""
    fcfg = config.federation
    return round_spec(start.identity, start.reference, fcfg.aggregation, start.round, fcfg.max_num_examples)


def aggregate_by_hand(
    updates: Sequence[str | Path], config: RunConfig, start: Start
) -> tuple[RoundResult, RoundPolicy]:
    """Validate and aggregate update files as the federation's server would.

    The policy has ``len(updates)`` clients, the config's seed, and the server optimizer state
    and pinned claims saved beside ``start.global_path`` (when there are).

    Returns:
        The result (``state`` is ``None`` when fewer than ``federation.min_clients`` updates were
        valid) and the policy (its ``server_opt`` is the state to save with the new global adapter).

    Raises:
        PayloadError: The saved server optimizer state is unreadable.
        AggregationError: It is not an optimizer state.
        LorafedError: The saved claims file is malformed.
        ConfigError: A key registry without ``federation.signing.server_key``.
        SignatureError: The registry or the server key is unreadable or not the registry's.
    """
    signing = server_signing(config.federation.signing)
    verifier = signing.registry.clients if signing is not None else None
    policy = RoundPolicy(config.federation, num_clients=len(updates), seed=config.seed, verifier=verifier)
    if start.global_path is not None and config.federation.server_optimizer != "none":
        saved = server_opt_path(start.global_path)
        if saved.is_file():
            policy.server_opt = load_server_opt(saved)
    if start.global_path is not None:
        policy.claims = load_claims(claims_path(start.global_path))
    spec = start_spec(start, config)
    result = policy.try_aggregate([Incoming.from_file(p) for p in updates], spec, start.reference, start.round)
    return result, policy


def write_global(
    out: str | Path, result: RoundResult, policy: RoundPolicy, start: Start
) -> tuple[Path, Path | None, PayloadMeta]:
    """Write the new global adapter, the pinned claims beside it, and the server optimizer state (if any).

    With a key registry in ``federation.signing``, the server's signature is written beside the
    adapter first (``<out>.sig``).

    Returns:
        The adapter's path, the optimizer state's path (or ``None``) and the adapter's header.

    Raises:
        LorafedError: ``result`` holds no new global adapter.
    """
    if result.state is None:
        raise LorafedError("no global adapter to write: too few valid updates")
    outcome, fcfg = result.outcome, policy.fcfg
    metrics: dict[str, Any] = {
        "clients": [m.client_id for _, m in outcome.accepted],
        "shares": outcome.shares,
        "rejected": len(outcome.rejected),
        "weighting": "uniform" if policy.dp is not None or fcfg.robust != "none" else fcfg.weighting,
        "robust": fcfg.robust,
        "aggregation": fcfg.aggregation,
        "server_optimizer": fcfg.server_optimizer,
    }
    if outcome.clipped:
        metrics["clipped"] = outcome.clipped
    if outcome.lowered:
        metrics["weight_lowered"] = {
            cid: {"cosine": low.cosine, "claimed": low.claimed, "weight": low.weight}
            for cid, low in outcome.lowered.items()
        }
    if result.privacy:
        metrics["privacy"] = result.privacy
    meta = start.identity.meta("server", start.round, outcome.num_examples, kind="global", metrics=metrics)
    data = payload_to_bytes(result.state, meta)
    signing = server_signing(fcfg.signing)
    if signing is not None:
        write_signature(out, signing.sign_global(data))
    save_claims(claims_path(out), policy.claims)
    path = atomic_write_bytes(out, data)
    opt_path = save_server_opt(server_opt_path(path), policy.server_opt) if policy.server_opt is not None else None
    return path, opt_path, meta

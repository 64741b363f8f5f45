"""The in-process engine: every client and the server on one machine, one model in memory.

Each chosen client trains in turn on the shared model and hands the server the same payload
bytes a remote client would send; the server step, the record and the retries are those of
:mod:`lorafed.engine.loop`. A client that raises is recorded as failed; one that takes longer
than ``federation.client_timeout_s`` is dropped once it returns (one process cannot pre-empt a
client, so a late update is discarded, as a server ignores it after its deadline).

With ``federation.signing.generate: true`` every client and the server get a fresh Ed25519 key
pair in ``<run>/keys/`` with the registry beside them: the transport signs each client's update
with that client's key and the server step verifies it, and each global adapter is signed by the
server and checked before the clients train from it, as in a deployment.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lorafed.client.round import update_meta
from lorafed.config import RunConfig, save_config
from lorafed.engine.cohort import ClientFn, Cohort, evaluate_state, prepare_cohort, train_client
from lorafed.engine.loop import Dispatched, Federated, StopFn, run_rounds, start
from lorafed.engine.record import RunRecord
from lorafed.errors import ConfigError
from lorafed.server.fold import Incoming
from lorafed.server.step import RoundPolicy
from lorafed.wire.payload import payload_to_bytes
from lorafed.wire.sign import Signing, generate_signing

logger = logging.getLogger(__name__)


class InProcess:
    """The :class:`~lorafed.engine.loop.Transport` of the in-process engine.

    Args:
        fed: The prepared federation.
        run_client: A client's round (:func:`~lorafed.engine.cohort.train_client`, maybe wrapped
            by :mod:`lorafed.engine.faults`).
        signing: Every client's key and the server's (``None``: nothing is signed).
    """

    def __init__(self, fed: Cohort, run_client: ClientFn, signing: Signing | None = None) -> None:
        self.fed = fed
        self.run_client = run_client
        self.signing = signing

    def dispatch(
        self, round_: int, clients: list[int], global_bytes: bytes, global_state: dict[str, torch.Tensor]
    ) -> Dispatched:
        out = Dispatched()
        timeout = self.fed.config.federation.client_timeout_s
        if self.signing is not None:  # what every client would check before training from it
            self.signing.check_global(global_bytes, self.signing.sign_global(global_bytes), f"global r{round_ - 1}")
        for k in clients:
            cid = self.fed.partition.client_ids[k]
            t = time.perf_counter()
            try:
                tensors, res = self.run_client(self.fed, global_state, k, round_)
            except Exception as exc:  # any client fault is recorded; the loop decides what follows
                out.failures.append({"client": cid, "reason": f"raised {type(exc).__name__}: {exc}"})
                continue
            took = time.perf_counter() - t
            if timeout is not None and took > timeout:
                out.failures.append(
                    {"client": cid, "reason": f"timed out: took {took:.2f} s, over client_timeout_s={timeout}"}
                )
                continue
            meta = update_meta(self.fed.client_identity(cid), self.fed.config, cid, round_, res)
            data = payload_to_bytes(tensors, meta)
            sig = self.signing.sign_update(cid, data) if self.signing is not None else None
            out.replies.append((k, Incoming(cid, data, signature=sig)))
        return out


def simulate(
    config: RunConfig,
    out_dir: str | Path,
    progress: bool = True,
    *,
    resume: bool = False,
    client_fn: Callable[[ClientFn], ClientFn] | None = None,
    fed: Cohort | None = None,
    stop: StopFn | None = None,
) -> dict[str, Any]:
    """Run a whole federated simulation and write its run folder (see :mod:`lorafed.engine.record`).

    Args:
        config: The run config.
        out_dir: The run folder.
        progress: Show progress bars (on a terminal only, see :mod:`lorafed.progress`).
        resume: Continue the run in ``out_dir`` from its last completed round (an interrupted
            round is redone from scratch). Each client's round is seeded by (seed, round,
            client) only, so a resumed run ends with the same adapter as an uninterrupted one.
        client_fn: Wraps the client's round (:func:`~lorafed.engine.cohort.train_client`), e.g.
            to inject faults or attacks; it receives the real one and returns the one to call.
        fed: A federation already prepared for ``config`` (benchmarks reuse one across runs
            that differ only in the server or transport settings).
        stop: Ends the run after a round when it answers true (see :func:`lorafed.engine.loop.run_rounds`).

    Returns:
        The summary (also written to ``summary.json``).

    Raises:
        LorafedError: For bad config, data, a run folder that cannot be resumed, or a round
            without enough valid updates after its retries.
    """
    t0 = time.perf_counter()
    fed = prepare_cohort(config) if fed is None else fed
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    base: ClientFn = functools.partial(train_client, progress=progress)
    run_client = client_fn(base) if client_fn is not None else base
    fcfg = config.federation
    signing = simulation_signing(config, list(fed.partition.client_ids), out)
    record = RunRecord(out)
    policy = RoundPolicy(
        fcfg, len(fed.partition.client_ids), config.seed, signing.registry.clients if signing else None
    )
    loop = Federated(
        fcfg,
        policy,
        record,
        fed.identity,
        fed.spec,
        list(fed.partition.client_ids),
        functools.partial(evaluate_state, fed),
        signing,
    )
    state = None
    if resume:
        state, policy.server_opt = record.resume(fed.spec(None), fcfg.server_optimizer != "none")
        if state is not None:
            policy.claims = record.read_claims(record.rows[-1]["round"])
    else:
        record.fresh()
    if state is None:
        state = fed.initial_state
        start(loop, state)
    first = record.rows[-1]["round"] + 1
    state, last = run_rounds(loop, InProcess(fed, run_client, signing), state, first, fcfg.rounds, progress, stop)
    if last is None:  # nothing left to run (resumed a finished run, or rounds=0): score the state held
        last = evaluate_state(fed, state)
    rows = record.rows
    summary = {
        "run": config.name,
        "engine": "in-process",
        "output_dir": str(out),
        "base_fingerprint": fed.client.fingerprint,
        "precision": fed.client.precision,
        "labels": list(fed.data.label_names),
        "clients": dict(zip(fed.partition.client_ids, fed.partition.sizes(), strict=True)),
        "test_rows": len(fed.test_positions),
        "round0": {"loss": rows[0]["test_loss"], "accuracy": rows[0]["accuracy"], "macro_f1": rows[0]["macro_f1"]},
        "final": last.summary(),
        "final_round": rows[-1]["round"],
        "per_class": last.per_class,
        "confusion": last.confusion,
        "adapter_bytes": int(record.global_path(rows[-1]["round"]).stat().st_size),
        "wall_seconds": time.perf_counter() - t0,
        "resumed": resume,
    }
    return record.finish(summary)


def simulation_signing(config: RunConfig, client_ids: list[str], out: Path) -> Signing | None:
    """The keys of a simulation: fresh ones in ``out/keys`` with ``federation.signing.generate``, else none.

    Raises:
        ConfigError: ``federation.signing.registry`` is set: one process plays every client, so it
            would need every client's private key; use ``generate: true``.
    """
    scfg = config.federation.signing
    if scfg.registry:
        raise ConfigError(
            [
                "federation.signing.registry: simulate plays every client and would need all their private keys; "
                "use federation.signing.generate=true (fresh keys in <run>/keys) or a deployment engine"
            ]
        )
    return generate_signing(client_ids, out / "keys") if scfg.generate else None

"""The file-drop engine: no server process, only a shared folder (or object store) and a coordinator.

Layout of the drop (names relative to its root)::

    global_r0.safetensors          the initial adapter, published by the coordinator
    round_N/<client>.safetensors   updates of round N, trained from global_r{N-1} (written atomically)
    global_rN.safetensors          the adapter after N rounds, published atomically
    done.json                      written after the last round; clients stop

With a key registry (``federation.signing``) every ``X.safetensors`` above has its detached
signature ``X.safetensors.sig`` beside it (see :mod:`lorafed.wire.sign`), written *before* the
payload, so whoever sees a payload finds its signature: the coordinator's for global adapters,
each client's for its update.

:func:`coordinate` runs the shared round loop (:mod:`lorafed.engine.loop`) with a
:class:`FileDrop` transport: publishing the global adapter is the dispatch, and the round closes
when ``ceil(fraction x N)`` updates have arrived, or at the deadline
(``federation.client_timeout_s``, default :data:`DEFAULT_DEADLINE_S`). The server step then
validates each update once and needs ``federation.min_clients`` valid ones; a round short of
them waits for more, up to ``federation.round_retries`` further deadlines. Updates that arrive
after a round was aggregated are ignored. :func:`poll_and_train` is the client side.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from lorafed.client.local import LocalClient
from lorafed.config import RunConfig, save_config
from lorafed.engine.loop import Dispatched, Federated, run_rounds, start
from lorafed.engine.record import RunRecord
from lorafed.engine.storage import Storage
from lorafed.errors import LorafedError, PayloadError
from lorafed.server.fold import Incoming
from lorafed.server.specs import federation_base, federation_labels, round_spec
from lorafed.server.step import RoundPolicy
from lorafed.wire.payload import ModelIdentity, PayloadMeta, payload_to_bytes
from lorafed.wire.reader import header_from_bytes, payload_from_bytes
from lorafed.wire.sign import SIG_SUFFIX, Signing, decode_signature, encode_signature, server_signing

logger = logging.getLogger(__name__)
DONE = "done.json"
#: Seconds a round waits for its updates when ``federation.client_timeout_s`` is not set.
DEFAULT_DEADLINE_S = 3600.0


def global_name(round_: int) -> str:
    """Name of the adapter after ``round_`` rounds."""
    return f"global_r{round_}.safetensors"


class FileDrop:
    """The :class:`~lorafed.engine.loop.Transport` of a shared folder or object store.

    A round's wait ends when enough *distinct clients* have dropped an update whose header is
    for this round and this federation's base (a quick header check; the server step still
    validates every update in full, once). Files never count twice for one client.

    Args:
        storage: The drop.
        identity: The federation identity (headers from another base do not count).
        deadline_s: Seconds a dispatch waits for its updates.
        poll_s: Seconds between listings of the drop.
        signing: The server's keys: each global adapter is published with its signature, and each
            update's ``.sig`` is handed to the server step with it (``None``: nothing signed).
    """

    def __init__(
        self,
        storage: Storage,
        identity: ModelIdentity,
        deadline_s: float,
        poll_s: float = 0.5,
        signing: Signing | None = None,
    ) -> None:
        self.storage = storage
        self.signing = signing
        self.identity = identity
        self.deadline_s = deadline_s
        self.poll_s = poll_s
        self.seen: dict[int, set[str]] = {}

    def dispatch(
        self, round_: int, clients: list[int], global_bytes: bytes, global_state: dict[str, torch.Tensor]
    ) -> Dispatched:
        name = global_name(round_ - 1)
        if not self.storage.exists(name):
            if self.signing is not None:  # the signature first: a client that sees the adapter finds it
                self.storage.write(name + SIG_SUFFIX, encode_signature(self.signing.sign_global(global_bytes)))
            self.storage.write(name, global_bytes)
            logger.info("published %s; waiting for %d update(s) of round %d", name, len(clients), round_)
        seen = self.seen.setdefault(round_, set())
        out = Dispatched()
        ids: set[str] = set()
        t0 = time.monotonic()
        while True:
            for item in self.storage.list(f"round_{round_}"):
                if item in seen or item.endswith(SIG_SUFFIX):
                    continue
                seen.add(item)
                try:
                    data = self.storage.read(item)
                    sig = self._signature(item)
                except (LorafedError, OSError) as exc:  # a link, a vanished file: this file only
                    out.failures.append({"client": item, "reason": f"unreadable: {exc}"})
                    continue
                try:
                    head = header_from_bytes(data, item)
                except PayloadError:  # the server step rejects it, with its reason
                    out.replies.append((-1, Incoming(item, data, signature=sig)))
                    continue
                meta = head.meta
                reason = self._misplaced(item, meta, ids)
                if reason:
                    out.failures.append({"client": item, "reason": reason})
                    continue
                out.replies.append((-1, Incoming(item, data, signature=sig, header=head)))  # parsed once
                if meta.round == round_ and meta.base_fingerprint == self.identity.base_fingerprint:
                    ids.add(meta.client_id)
            if len(ids) >= len(clients):
                return out
            if time.monotonic() - t0 > self.deadline_s:
                out.failures.append(
                    {
                        "client": "(drop)",
                        "reason": f"deadline: {len(ids)} of {len(clients)} expected client update(s) after "
                        f"{self.deadline_s:g} s",
                    }
                )
                return out
            time.sleep(self.poll_s)

    def _signature(self, item: str) -> bytes | None:
        """The signature dropped beside update ``item`` (``None``: signing off, or none there).

        Raises:
            SignatureError: A malformed signature file.
        """
        name = item + SIG_SUFFIX
        if self.signing is None or not self.storage.exists(name):
            return None
        return decode_signature(self.storage.read(name), name)

    @staticmethod
    def _misplaced(item: str, meta: PayloadMeta, ids: set[str]) -> str | None:
        """Why a readable update file is not handed to the server step, or ``None``.

        A file must be named after the client id in its header (``round_N/<client>.safetensors``),
        so a party cannot drop an update under another client's id and get that client's genuine
        update refused as a duplicate; a second file of a client already counted this round is
        recorded as a duplicate (the server step would refuse both).
        """
        stem = item.rsplit("/", 1)[-1].removesuffix(".safetensors")
        if stem != meta.client_id:
            return (
                f"file name {item!r} does not match the client id {_brief(meta.client_id)} in its header "
                "(expected round_N/<client_id>.safetensors); not aggregated"
            )
        if meta.client_id in ids:
            return f"duplicate: a second update of client {meta.client_id!r} this round; not aggregated"
        return None


def _brief(text: str, limit: int = 60) -> str:
    """``repr(text)`` cut to ``limit`` characters."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def coordinate(
    config: RunConfig,
    storage: Storage,
    out_dir: str | Path,
    num_clients: int | None = None,
    poll_s: float = 0.5,
) -> dict[str, Any]:
    """Run ``federation.rounds`` rounds over ``storage``; keep the run record in ``out_dir``.

    Args:
        config: The federation's config (model, LoRA, ``data.labels``, ``federation.*``).
        storage: The drop.
        out_dir: The run record (:mod:`lorafed.engine.record`; no test scores: the coordinator
            holds no data).
        num_clients: N, the clients taking part; a round waits for ``ceil(fraction x N)``
            updates (default: ``federation.min_clients``).
        poll_s: Seconds between listings of the drop.

    Raises:
        AggregationError: A round without ``min_clients`` valid updates after its retries.
        LorafedError: The drop already holds a federation.
    """
    if storage.exists(global_name(0)) or storage.exists(DONE):
        raise LorafedError(f"the drop already holds a federation ({global_name(0)} or {DONE}); use an empty one")
    fcfg = config.federation
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    if config.data.labels is None and config.data.path:  # the coordinator's own copy of the data names them
        from lorafed.data.clean import load_labeled

        labels = load_labeled(config.data, config.seed).label_names
    else:
        labels = federation_labels(config)
    identity, fresh = federation_base(config, labels)

    def spec(r: int | None) -> Any:
        return round_spec(identity, fresh, fcfg.aggregation, r, fcfg.max_num_examples)

    n = num_clients or fcfg.min_clients
    signing = server_signing(config.federation.signing)
    record = RunRecord(out)
    record.fresh()
    policy = RoundPolicy(fcfg, n, config.seed, signing.registry.clients if signing else None)
    loop = Federated(fcfg, policy, record, identity, spec, [f"#{i}" for i in range(n)], signing=signing)
    start(loop, fresh)
    deadline = fcfg.client_timeout_s if fcfg.client_timeout_s is not None else DEFAULT_DEADLINE_S
    run_rounds(loop, FileDrop(storage, identity, deadline, poll_s, signing), fresh, 1, fcfg.rounds)
    final = record.global_path(fcfg.rounds).read_bytes()
    if signing is not None:
        storage.write(global_name(fcfg.rounds) + SIG_SUFFIX, encode_signature(signing.sign_global(final)))
    storage.write(global_name(fcfg.rounds), final)
    summary = {"run": config.name, "engine": "file-drop", "rounds": fcfg.rounds, "final": global_name(fcfg.rounds)}
    storage.write(DONE, json.dumps(summary).encode())
    return record.finish(summary)


def latest_global(storage: Storage) -> int:
    """The highest N with ``global_rN`` published, or -1."""
    n = -1
    while storage.exists(global_name(n + 1)):
        n += 1
    return n


def _refuse_claimed(storage: Storage, name: str, client_id: str, round_: int) -> None:
    """Refuse to drop an update under a client id that already has one in this round.

    Raises:
        LorafedError: Another poller (or an earlier run of this one) used this id for the round.
    """
    if storage.exists(name):
        raise LorafedError(
            f"client id {client_id!r} already has an update in round {round_} of this drop ({name}): another "
            "poller is using this id; give each client its own id (--client-id)"
        )


def poll_and_train(
    config: RunConfig,
    storage: Storage,
    client: int,
    data_path: str | None = None,
    client_id: str | None = None,
    poll_s: float = 0.5,
    timeout_s: float = 3600.0,
) -> int:
    """Client side: for each newly published global adapter, train and drop an update; return rounds done.

    The client is one of the config's partition (``client``), or a company's own file
    (``data_path``, named ``client_id``). It joins at the latest published round and stops at
    ``done.json``, after ``federation.rounds`` rounds, or when nothing new is published for
    ``timeout_s`` seconds.

    Raises:
        LorafedError: No global adapter appeared within ``timeout_s``, or a global adapter that
            does not fit this client's model or labels.
        SignatureError: Signing is on and a global adapter is not signed by the server.
    """
    local: LocalClient | None = None
    done = 0
    waited_since = time.monotonic()
    r = max(latest_global(storage), 0) + 1
    while r <= config.federation.rounds and not storage.exists(DONE):
        if not storage.exists(global_name(r - 1)):
            if time.monotonic() - waited_since > timeout_s:
                raise LorafedError(f"no {global_name(r - 1)} in the drop within {timeout_s:g} s")
            time.sleep(poll_s)
            continue
        gname = global_name(r - 1)
        gdata = storage.read(gname)
        glob = payload_from_bytes(gdata, gname)
        if local is None:  # the first global adapter names the federation's labels
            if data_path:
                labels = federation_labels(config, glob.meta, global_name(r - 1))
                local = LocalClient.from_file(config, client_id or "client", data_path, labels)
            else:
                local = LocalClient.from_partition(config, client, client_id)
        gsig = None
        if storage.exists(gname + SIG_SUFFIX):
            gsig = decode_signature(storage.read(gname + SIG_SUFFIX), gname + SIG_SUFFIX)
        name = f"round_{r}/{local.client_id}.safetensors"
        _refuse_claimed(storage, name, local.client_id, r)
        update = local.step(local.check_global(glob, gname, gdata, gsig), r, progress=False)
        _refuse_claimed(storage, name, local.client_id, r)  # another poller may have written meanwhile
        data = payload_to_bytes(update.tensors, update.meta)
        sig = local.sign(data)
        if sig is not None:  # the signature first: the coordinator that sees the update finds it
            storage.write(name + SIG_SUFFIX, encode_signature(sig))
        storage.write(name, data)
        logger.info("%s: round %d update dropped (loss %.4f)", local.client_id, r, update.result.mean_loss)
        done += 1
        r += 1
        waited_since = time.monotonic()
    return done

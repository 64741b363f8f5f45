"""A client that holds its own rows: a company's own file, or one client of a config's partition.

:class:`LocalClient` loads its rows and model once and runs the one client step
(:func:`lorafed.client.round.client_step`) each round: what a file-drop poller, a Flower node and
``lorafed client train`` (:func:`run_client_round`) run.

With a key registry (``federation.signing.registry``) a client refuses a global adapter the
server did not sign (:meth:`LocalClient.check_global`) and signs each update it sends with its own
key (``federation.signing.client_key``; :meth:`LocalClient.sign`, :func:`write_update`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafed.client.round import ClientUpdate, check_client_id, client_step, identity_of, resolve_round, set_threads
from lorafed.config import RunConfig
from lorafed.data.clean import load_labeled
from lorafed.data.tokens import Split, TokenizedRows, split_indices
from lorafed.errors import ConfigError, DataError, PayloadError, PayloadValidationError, SignatureError
from lorafed.model.backbone import ClientModel, load_client_model
from lorafed.partition import partition, partition_columns
from lorafed.seeds import split_seed
from lorafed.server.hetero import start_for_client
from lorafed.server.specs import spec_for
from lorafed.server.validate import validate_update
from lorafed.wire.adapter import get_adapter_state
from lorafed.wire.payload import ModelIdentity, Payload, payload_to_bytes
from lorafed.wire.sign import Signing, signing_from_config, write_signature

logger = logging.getLogger(__name__)


@dataclass
class LocalClient:
    """A client that holds its own rows, its own model, and runs :func:`client_step` on them.

    Attributes:
        client_id: The client's id.
        config: The federation config.
        model: The client's model.
        rows: The client's rows, tokenized once.
        split: Train and validation positions into ``rows``.
        identity: The federation identity of this client's model.
        fresh: The seeded fresh adapter (as loaded, before any training).
        signing: The key registry and this client's key (``federation.signing``), or ``None``:
            then global adapters are not checked and updates are not signed.
    """

    client_id: str
    config: RunConfig
    model: ClientModel
    rows: TokenizedRows
    split: Split
    identity: ModelIdentity
    fresh: dict[str, torch.Tensor]
    signing: Signing | None = field(default=None, repr=False)

    @classmethod
    def from_file(cls, config: RunConfig, client_id: str, data_path: str, labels: tuple[str, ...]) -> LocalClient:
        """A company's client on its own file: all rows train but a ``data.val_fraction`` slice.

        No test rows are kept back: a client's file is not a place to hold out a test set the
        federation never sees (``data.test_fraction`` applies to simulated partitions only).

        Raises:
            ConfigError: A bad client id.
            DataError: The file cannot be read or leaves no training rows.
        """
        check_client_id(client_id)
        data_cfg = dataclasses.replace(config.data, path=data_path, labels=tuple(labels), max_rows=None)
        data = load_labeled(data_cfg, config.seed)
        for reason, count in data.dropped.items():
            logger.info("%s: dropped %d rows: %s", client_id, count, reason)
        split = split_indices(np.arange(len(data)), config.data.val_fraction, 0.0, split_seed(config.seed, client_id))
        if len(split.train) == 0:
            raise DataError(f"{len(data)} usable rows leave no training rows after the split", path=data.path)
        return cls._build(config, client_id, data, split, labels)

    @classmethod
    def from_partition(cls, config: RunConfig, k: int, client_id: str | None = None) -> LocalClient:
        """Client ``k`` of the config's partition (its train and validation rows only are tokenized).

        Raises:
            ConfigError: ``k`` outside the partition.
        """
        data = load_labeled(config.data, config.seed, extra_columns=partition_columns(config.partition))
        part = partition(data, config.partition, config.seed)
        if not 0 <= k < len(part.client_ids):
            raise ConfigError([f"client index: expected 0..{len(part.client_ids) - 1}, got {k}"], "client")
        cid = part.client_ids[k]
        split = split_indices(
            part.indices[k], config.data.val_fraction, config.data.test_fraction, split_seed(config.seed, cid)
        )
        keep = np.sort(np.concatenate([split.train, split.val]))
        local = Split(np.searchsorted(keep, split.train), np.searchsorted(keep, split.val), np.empty(0, np.int64))
        return cls._build(config, client_id or cid, data.subset(keep), local, data.label_names, own_rank(config, cid))

    @classmethod
    def _build(
        cls,
        config: RunConfig,
        client_id: str,
        data: Any,
        split: Split,
        labels: tuple[str, ...],
        rank: int | None = None,
    ) -> LocalClient:
        """The client, its model with LoRA rank ``rank`` (default ``model.lora.r``; see :func:`own_rank`)."""
        set_threads(config.train.num_threads)
        lora = dataclasses.replace(config.model.lora, r=rank or config.model.lora.r)
        own = dataclasses.replace(config, model=dataclasses.replace(config.model, lora=lora))
        model = load_client_model(own.model, labels, config.seed)
        rows = TokenizedRows(data, model.tokenizer, config.data.max_length, config.data.pair_mode)
        identity = identity_of(model, own, tuple(labels))
        signing = signing_from_config(config.federation.signing, client_id)
        return cls(client_id, config, model, rows, split, identity, get_adapter_state(model.model), signing)

    def check_global(
        self, glob: Payload, source: str, data: bytes | None = None, signature: bytes | None = None
    ) -> dict[str, torch.Tensor]:
        """The global adapter's fp32 tensors, once it is shown to be the server's and to fit this client.

        Args:
            glob: The global adapter, parsed from ``data``.
            source: Where it came from, for messages.
            data: Its bytes as received (needed, with ``signature``, when signing is on).
            signature: The server's signature that came with it (file drop and ``client train``:
                the ``.sig`` beside it; Flower: an entry of the message).

        Raises:
            SignatureError: Signing is on and the global adapter is unsigned or not signed by the
                registry's server key.
            PayloadError: It was made for another base model, LoRA config, labels or tensors
                (with ``federation.hetero_ranks``, another LoRA rank and alpha are accepted, and
                the tensors returned are the global adapter truncated to this client's rank).
        """
        if self.signing is not None:
            if data is None:
                raise SignatureError("signing is on but the global adapter's bytes were not given to verify", source)
            self.signing.check_global(data, signature, source)
        spec = spec_for(self.identity, get_adapter_state(self.model.model), None)
        hetero = self.config.federation.hetero_ranks
        spec = dataclasses.replace(spec, hetero_ranks=hetero)
        try:
            validate_update(glob, spec, source)
        except PayloadValidationError as exc:
            raise PayloadError(f"the global adapter does not fit this client's config: {exc}", source) from exc
        state = {k: v.to(torch.float32) for k, v in glob.decoded().items()}
        if hetero:  # the global delta truncated to this client's rank (server.hetero)
            return start_for_client(state, glob.meta.lora, self.identity.lora, self.fresh)
        return state

    def sign(self, data: bytes) -> bytes | None:
        """This client's signature of its update ``data``, or ``None`` when signing is off.

        Raises:
            SignatureError: Signing is on but ``federation.signing.client_key`` is not set.
        """
        return self.signing.sign_update(self.client_id, data) if self.signing is not None else None

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The seeded fresh adapter every client and the server start round 1 from."""
        return {k: v.clone() for k, v in self.fresh.items()}

    def step(self, global_state: dict[str, torch.Tensor], round_: int, progress: bool = True) -> ClientUpdate:
        """Train one round from ``global_state`` (see :func:`client_step`) and score the validation slice."""
        logger.info(
            "%s: round %d, %d training rows, %d validation rows",
            self.client_id,
            round_,
            len(self.split.train),
            len(self.split.val),
        )
        return client_step(
            self.model,
            self.rows,
            self.split,
            global_state,
            round_,
            self.config,
            self.client_id,
            self.identity,
            progress,
            validate=True,
        )


def own_rank(config: RunConfig, client_id: str) -> int:
    """The LoRA rank partition client ``client_id`` trains at: its ``model.lora.client_ranks`` entry
    in a ``federation.hetero_ranks`` federation, else ``model.lora.r``.

    The in-process engine's client of that id trains at the same rank
    (:meth:`lorafed.engine.cohort.Cohort.client_identity`), so a Flower node or a file-drop poller
    of the partition sends what the simulator's client sends.
    """
    lora = config.model.lora
    if not config.federation.hetero_ranks:
        return lora.r
    return (lora.client_ranks or {}).get(client_id, lora.r)


def write_client_files(config: RunConfig, out_dir: str | Path) -> dict[str, Path]:
    """Write each client of ``config``'s partition to its own CSV (all original columns, file order).

    For trying the cross-silo workflow on one machine: every file then plays one company's data.

    Returns:
        Client id -> CSV path.
    """
    from lorafed.data.read import read_table
    from lorafed.files import atomic_write_text

    pc = config.partition
    data = load_labeled(config.data, config.seed, partition_columns(pc))
    part = partition(data, pc, config.seed)
    frame = read_table(config.data.path, config.data.format, config.data.encoding)
    out: dict[str, Path] = {}
    for cid, idx in zip(part.client_ids, part.indices, strict=True):
        rows = frame.iloc[data.source_rows[idx] - 1]
        out[cid] = atomic_write_text(Path(out_dir) / f"{cid}.csv", rows.to_csv(index=False))
        logger.info("%s: %d rows -> %s", cid, len(rows), out[cid])
    return out


def run_client_round(
    config: RunConfig,
    client_id: str,
    global_path: str | Path | None = None,
    round_: int | None = None,
    progress: bool = True,
) -> ClientUpdate:
    """A company's round on its own file ``config.data.path`` (what ``lorafed client train`` runs).

    Args:
        config: The federation's config; ``data.path`` is this client's own file.
        client_id: This client's id (seeds its split and its training, names it in the header).
        global_path: The current global adapter; ``None`` before round 1 (the seeded fresh adapter).
        round_: The round; by default the global adapter's round + 1, or 1.
        progress: Show a progress bar.

    Raises:
        ConfigError: No label list (see :func:`~lorafed.server.specs.federation_labels`), bad id or round.
        DataError: The file cannot be read or leaves no training rows.
        PayloadError: The global adapter is unreadable or does not fit this config.
        SignatureError: Signing is on and the global adapter is not the server's (see
            :meth:`LocalClient.check_global`).
    """
    from lorafed.server.specs import federation_labels
    from lorafed.wire.reader import load_payload, payload_from_bytes
    from lorafed.wire.sign import read_signature

    check_client_id(client_id)
    data = sig = glob = None
    if global_path is not None:
        if not Path(global_path).is_file():
            load_payload(global_path)  # raises its "not found" error
        data = Path(global_path).read_bytes()  # read once: the bytes verified are the bytes parsed
        glob = payload_from_bytes(data, str(global_path))
        sig = read_signature(global_path)
    labels = federation_labels(config, glob.meta if glob else None, str(global_path or "config"))
    round_ = resolve_round(round_, glob.meta if glob else None, str(global_path))
    local = LocalClient.from_file(config, client_id, config.data.path, labels)
    state = local.check_global(glob, str(global_path), data, sig) if glob is not None else local.initial_state()
    logger.info("%s: starting from %s", client_id, global_path or "the seeded fresh adapter")
    return local.step(state, round_, progress)


def write_update(config: RunConfig, client_id: str, update: ClientUpdate, out: str | Path) -> tuple[Path, Path | None]:
    """Write a client's update to ``out`` and, when signing is on, its signature beside it (``.sig``).

    The signature is written first, so whoever sees the update finds its signature.

    Returns:
        The update's path and the signature's (``None`` when signing is off).

    Raises:
        SignatureError: The key or registry is unreadable, or the key is not ``client_id``'s.
    """
    from lorafed.files import atomic_write_bytes

    data = payload_to_bytes(update.tensors, update.meta)
    signing = signing_from_config(config.federation.signing, client_id)
    sig_file = write_signature(out, signing.sign_update(client_id, data)) if signing is not None else None
    return atomic_write_bytes(out, data), sig_file

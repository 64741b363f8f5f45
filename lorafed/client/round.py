"""The client step: (model, rows, global adapter, round) -> the update a client sends.

Every engine runs :func:`client_step`: the in-process simulator for each of its clients, a
file-drop poller, a Flower node, and ``lorafed client train``. It loads the global adapter,
trains the round's roles (all of LoRA and the head for FedAvg; B and the head for FFA-LoRA; A or
B in turn for RoLoRA, see :mod:`lorafed.wire.roles`), and returns exactly the tensors of those
roles with their header. Seeds depend only on the config seed, the round and the client id, so
the same client produces the same tensors in every engine.

:class:`LocalClient` is a client that holds its own rows: a company's own file (it trains on all
of it but a validation slice, whose scores it reports) or one client of a config's partition.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafed.client.train import TrainResult, train_local
from lorafed.config import RunConfig
from lorafed.data.clean import load_labeled
from lorafed.data.tokens import Split, TokenizedRows, split_indices
from lorafed.errors import ConfigError, DataError, PayloadError, PayloadValidationError
from lorafed.metrics import EvalResult, evaluate
from lorafed.model.backbone import ClientModel, load_client_model, lora_config_dict
from lorafed.partition import partition, partition_columns
from lorafed.seeds import client_seed, split_seed
from lorafed.server.specs import spec_for
from lorafed.server.validate import validate_update
from lorafed.wire.adapter import get_adapter_state, set_adapter_state
from lorafed.wire.compress import update_wire
from lorafed.wire.payload import ModelIdentity, Payload, PayloadMeta
from lorafed.wire.roles import round_keys, round_roles, select, trainable_roles

logger = logging.getLogger(__name__)

#: Client ids travel in headers and name files: keep them to safe characters.
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass(frozen=True)
class ClientUpdate:
    """What one client's round produced.

    Attributes:
        tensors: The adapter tensors of the round's roles (fp32), as they will be sent.
        meta: The payload header (``num_examples`` = the client's training rows).
        result: The training summary.
        validation: Scores on the client's validation rows, or ``None`` when not evaluated.
    """

    tensors: dict[str, torch.Tensor]
    meta: PayloadMeta
    result: TrainResult
    validation: EvalResult | None = None


def set_threads(num_threads: int) -> int:
    """Use ``num_threads`` intra-op threads (0: every core this process may use); return the number set."""
    n = num_threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def identity_of(model: ClientModel, config: RunConfig, labels: tuple[str, ...]) -> ModelIdentity:
    """The federation identity of a client model: its base fingerprint, the LoRA config, the labels."""
    return ModelIdentity(model.fingerprint, lora_config_dict(config.model.lora), tuple(labels))


def update_meta(
    identity: ModelIdentity,
    config: RunConfig,
    client_id: str,
    round_: int,
    result: TrainResult,
    validation: EvalResult | None = None,
) -> PayloadMeta:
    """The header of a client's update: its training figures and the configured wire encoding."""
    metrics: dict[str, Any] = {"loss": result.mean_loss, "steps": result.steps, "seconds": round(result.seconds, 3)}
    if validation is not None:
        metrics.update(val_loss=validation.loss, val_accuracy=validation.accuracy, val_macro_f1=validation.macro_f1)
    if result.privacy:
        metrics.update(result.privacy)
    dtype, block_size = update_wire(config.federation)
    return identity.meta(client_id, round_, result.num_examples, "update", metrics, dtype, block_size)


def client_step(
    model: ClientModel,
    rows: TokenizedRows,
    split: Split,
    global_state: dict[str, torch.Tensor],
    round_: int,
    config: RunConfig,
    client_id: str,
    identity: ModelIdentity,
    progress: bool = True,
    validate: bool = False,
) -> ClientUpdate:
    """Train one client's round from ``global_state`` and return its update.

    Args:
        model: The client's model (its adapter is overwritten with ``global_state``).
        rows: Tokenized rows; ``split`` indexes them.
        split: The client's train and validation rows (its test rows are not used here).
        global_state: The global adapter (every tensor) the round starts from.
        round_: The round (>= 1).
        config: The federation config (``train``, ``federation.aggregation`` and transport, ``seed``).
        client_id: The client's id (its seeds and its name in the header).
        identity: The federation identity written in the header.
        progress: Show a progress bar over steps.
        validate: Score the validation rows after training and report them in the header.

    Raises:
        PrivacyBudgetError: Under ``train.record_dp``, this round would exceed the client's budget
            (checked before any training; see :mod:`lorafed.client.dp`).
    """
    aggregation = config.federation.aggregation
    train_fn: Any = train_local
    plan = None
    if config.train.record_dp.enabled:
        from lorafed.client.dp import plan_record_dp, train_local_dp

        plan = plan_record_dp(config.train, len(split.train), config.federation.rounds)
        plan.check_budget(round_, client_id)
        train_fn = functools.partial(train_local_dp, plan=plan)
    set_adapter_state(model.model, global_state)
    with trainable_roles(model.model, round_roles(aggregation, round_)):
        result = train_fn(
            model.model,
            rows,
            split.train,
            config.train,
            client_seed(config.seed, round_, client_id),
            desc=f"r{round_} {client_id}",
            progress=progress,
        )
    if plan is not None:
        result = dataclasses.replace(result, privacy=plan.report(round_))
    sent = select(get_adapter_state(model.model), round_keys(aggregation, round_, global_state))
    val = None
    if validate and len(split.val):
        val = evaluate(model.model, rows, split.val, config.train.eval_batch_size, identity.labels)
    return ClientUpdate(sent, update_meta(identity, config, client_id, round_, result, val), result, val)


def check_client_id(client_id: str) -> str:
    """Return ``client_id`` if it is 1-128 characters of letters, digits, ``_``, ``.``, ``-``.

    Raises:
        ConfigError: Otherwise.
    """
    if not _CLIENT_ID.match(client_id):
        raise ConfigError([f"client id {client_id!r}: use 1-128 letters, digits, '_', '.' or '-'"], "client")
    return client_id


def resolve_round(round_: int | None, global_meta: PayloadMeta | None, source: str = "") -> int:
    """The round of this update: ``global round + 1`` (1 without a global adapter).

    Raises:
        ConfigError: An explicit ``round_`` that contradicts the global adapter's round.
    """
    expected = global_meta.round + 1 if global_meta is not None else None
    if round_ is None:
        return expected if expected is not None else 1
    if round_ < 1:
        raise ConfigError([f"--round: must be >= 1, got {round_}"], "client")
    if global_meta is not None and round_ != global_meta.round + 1:
        raise ConfigError(
            [
                f"--round {round_}: the global adapter {source} is from round {global_meta.round}, so this is round "
                f"{global_meta.round + 1}"
            ],
            "client",
        )
    return round_


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
    """

    client_id: str
    config: RunConfig
    model: ClientModel
    rows: TokenizedRows
    split: Split
    identity: ModelIdentity
    fresh: dict[str, torch.Tensor]

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
        return cls._build(config, client_id or cid, data.subset(keep), local, data.label_names)

    @classmethod
    def _build(cls, config: RunConfig, client_id: str, data: Any, split: Split, labels: tuple[str, ...]) -> LocalClient:
        set_threads(config.train.num_threads)
        model = load_client_model(config.model, labels, config.seed)
        rows = TokenizedRows(data, model.tokenizer, config.data.max_length, config.data.pair_mode)
        identity = identity_of(model, config, tuple(labels))
        return cls(client_id, config, model, rows, split, identity, get_adapter_state(model.model))

    def check_global(self, glob: Payload, source: str) -> dict[str, torch.Tensor]:
        """The global adapter's fp32 tensors, once it is shown to fit this client's model and labels.

        Raises:
            PayloadError: It was made for another base model, LoRA config, labels or tensors.
        """
        spec = spec_for(self.identity, get_adapter_state(self.model.model), None)
        try:
            validate_update(glob, spec, source)
        except PayloadValidationError as exc:
            raise PayloadError(f"the global adapter does not fit this client's config: {exc}", source) from exc
        return {k: v.to(torch.float32) for k, v in glob.decoded().items()}

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
    """
    from lorafed.server.specs import federation_labels
    from lorafed.wire.payload import load_payload

    check_client_id(client_id)
    glob = load_payload(global_path) if global_path is not None else None
    labels = federation_labels(config, glob.meta if glob else None, str(global_path or "config"))
    round_ = resolve_round(round_, glob.meta if glob else None, str(global_path))
    local = LocalClient.from_file(config, client_id, config.data.path, labels)
    state = local.check_global(glob, str(global_path)) if glob is not None else local.initial_state()
    logger.info("%s: starting from %s", client_id, global_path or "the seeded fresh adapter")
    return local.step(state, round_, progress)

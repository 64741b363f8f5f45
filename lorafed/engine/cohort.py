"""A federation assembled in one process: the data, every client's rows, the tokens and one model.

:func:`prepare_cohort` loads and cleans the data, partitions it, splits each client into
train/validation/test (seeded by client id), loads the model and tokenizes every row once. The
in-process engine and the benchmarks train each client in turn on the one model; Flower and the
file drop use it on the server side for the spec and the test rows.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from lorafed.client.local import own_rank
from lorafed.client.round import ClientUpdate, client_step, identity_of, set_threads
from lorafed.client.train import TrainResult
from lorafed.config import RunConfig
from lorafed.data.clean import LabeledData, load_labeled
from lorafed.data.tokens import Split, TokenizedRows, split_indices
from lorafed.errors import ConfigError
from lorafed.metrics import EvalResult, evaluate
from lorafed.model.backbone import ClientModel, load_client_model, model_header
from lorafed.partition import Partition, client_table, partition, partition_columns
from lorafed.seeds import split_seed
from lorafed.server.hetero import start_for_client
from lorafed.server.specs import round_spec
from lorafed.server.validate import UpdateSpec
from lorafed.wire.adapter import get_adapter_state, set_adapter_state
from lorafed.wire.payload import ModelIdentity
from lorafed.wire.roles import round_keys

logger = logging.getLogger(__name__)


@dataclass
class Cohort:
    """Everything an in-process federation needs, prepared once.

    Attributes:
        config: The run config.
        data: Clean rows and the global label list.
        partition: Client ids and their rows.
        splits: Train/validation/test rows of each client.
        rows: Every row tokenized once.
        client: The shared model (each client loads the global adapter into it in turn).
        test_positions: The global test rows (union of client test slices, maybe sampled).
        initial_state: The seeded round-0 adapter.
        identity: Base fingerprint, LoRA config and labels, written in every header.
        rank_models: With ``federation.hetero_ranks``: LoRA rank -> a model with adapters of that
            rank and its seeded fresh adapter, loaded on first use by a client of
            ``model.lora.client_ranks`` (the global rank's is ``client``).
    """

    config: RunConfig
    data: LabeledData
    partition: Partition
    splits: list[Split]
    rows: TokenizedRows
    client: ClientModel
    test_positions: np.ndarray
    initial_state: dict[str, torch.Tensor]
    identity: ModelIdentity
    rank_models: dict[int, tuple[ClientModel, dict[str, torch.Tensor]]] = field(default_factory=dict, repr=False)

    def sent_keys(self, round_: int | None) -> list[str]:
        """The adapter tensors trained and sent in ``round_`` (all of them for ``None``)."""
        return round_keys(self.config.federation.aggregation, round_, self.initial_state)

    def spec(self, round_: int | None) -> UpdateSpec:
        """What updates of ``round_`` must match: exactly the tensors sent in that round."""
        f = self.config.federation
        return round_spec(self.identity, self.initial_state, f.aggregation, round_, f.max_num_examples)

    def client_update(
        self, global_state: dict[str, torch.Tensor], k: int, round_: int, progress: bool = True
    ) -> ClientUpdate:
        """Client ``k`` trains one round from ``global_state`` (see :func:`~lorafed.client.round.client_step`).

        With ``federation.hetero_ranks`` the client trains adapters of its own rank
        (``model.lora.client_ranks``, default the global rank) from the global adapter truncated
        to that rank (:func:`~lorafed.server.hetero.start_for_client`).
        """
        cid = self.partition.client_ids[k]
        if not self.config.federation.hetero_ranks:
            return client_step(
                self.client, self.rows, self.splits[k], global_state, round_, self.config, cid, self.identity, progress
            )
        ident = self.client_identity(cid)
        model, fresh = self.model_of_rank(int(ident.lora["r"]))
        start = start_for_client(global_state, self.identity.lora, ident.lora, fresh)
        return client_step(model, self.rows, self.splits[k], start, round_, self.config, cid, ident, progress)

    def client_identity(self, client_id: str) -> ModelIdentity:
        """The identity in ``client_id``'s headers: the federation's, with its own LoRA rank
        (``model.lora.client_ranks``) in a ``federation.hetero_ranks`` federation."""
        lora = self.config.model.lora
        r = own_rank(self.config, client_id)  # what a Flower node or a poller of this client trains at
        if r == lora.r:
            return self.identity
        return dataclasses.replace(
            self.identity,
            lora=model_header(dataclasses.replace(self.config.model, lora=dataclasses.replace(lora, r=r))),
        )

    def model_of_rank(self, r: int) -> tuple[ClientModel, dict[str, torch.Tensor]]:
        """A model with LoRA adapters of rank ``r`` (seeded as every client's) and its fresh adapter."""
        if r == self.config.model.lora.r:
            return self.client, self.initial_state
        if r not in self.rank_models:
            mcfg = self.config.model
            mcfg = dataclasses.replace(mcfg, lora=dataclasses.replace(mcfg.lora, r=r))
            model = load_client_model(mcfg, self.data.label_names, self.config.seed)
            self.rank_models[r] = (model, get_adapter_state(model.model))
            logger.info("loaded a model with LoRA rank %d for the clients of that rank", r)
        return self.rank_models[r]


def prepare_cohort(config: RunConfig) -> Cohort:
    """Load and clean the data, partition it, split each client, load the model, tokenize once.

    Raises:
        ConfigError: No test rows, or fewer clients than ``federation.min_clients``.
        DataError: The data cannot be read.
    """
    part_cfg = config.partition
    data = load_labeled(config.data, config.seed, extra_columns=partition_columns(part_cfg))
    for reason, count in data.dropped.items():
        logger.info("dropped %d rows: %s", count, reason)
    part = partition(data, part_cfg, config.seed)
    if len(part.client_ids) < config.federation.min_clients:
        raise ConfigError(
            [
                f"federation.min_clients={config.federation.min_clients} but the partition has "
                f"{len(part.client_ids)} client(s); lower min_clients or use more clients"
            ]
        )
    unknown = sorted(set(config.model.lora.client_ranks or {}) - set(part.client_ids))
    if unknown:
        ids = ", ".join(part.client_ids)
        raise ConfigError([f"model.lora.client_ranks: no client {unknown[0]!r} in the partition; clients: {ids}"])
    splits = [
        split_indices(idx, config.data.val_fraction, config.data.test_fraction, split_seed(config.seed, cid))
        for cid, idx in zip(part.client_ids, part.indices, strict=True)
    ]
    logger.info(
        "%d rows, %d labels, %d clients (%s):", len(data), len(data.label_names), len(part.client_ids), part_cfg.scheme
    )
    logger.info("\n%s", client_table(part, data.labels, data.label_names))
    test = np.sort(np.concatenate([s.test for s in splits]))
    max_test = config.federation.max_test_rows
    if max_test is not None and len(test) > max_test:
        test = np.sort(np.random.default_rng(config.seed).choice(test, size=max_test, replace=False))
    if len(test) == 0:
        raise ConfigError(["data.test_fraction leaves no test rows; raise it or use more data"])
    set_threads(config.train.num_threads)  # logs "torch threads: N of C cores (...)"
    client = load_client_model(config.model, data.label_names, config.seed)
    rows = TokenizedRows(data, client.tokenizer, config.data.max_length, config.data.pair_mode)
    identity = identity_of(client, config, data.label_names)
    return Cohort(config, data, part, splits, rows, client, test, get_adapter_state(client.model), identity)


def train_client(
    fed: Cohort, global_state: dict[str, torch.Tensor], k: int, round_: int, progress: bool = True
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """Client ``k``'s round in the in-process engine: the tensors it sends and its training summary."""
    update = fed.client_update(global_state, k, round_, progress)
    return update.tensors, update.result


def evaluate_state(fed: Cohort, state: dict[str, torch.Tensor], positions: np.ndarray | None = None) -> EvalResult:
    """Score an adapter state on the global test rows (or ``positions``)."""
    set_adapter_state(fed.client.model, state)
    pos = fed.test_positions if positions is None else positions
    t = fed.config.train
    return evaluate(fed.client.model, fed.rows, pos, t.eval_batch_size, fed.data.label_names, t.autocast)


ClientFn = Callable[[Cohort, dict[str, torch.Tensor], int, int], tuple[dict[str, torch.Tensor], TrainResult]]
"""A client's round: ``(fed, global_state, client_index, round) -> (adapter tensors, TrainResult)``."""

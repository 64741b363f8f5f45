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
from dataclasses import dataclass
from typing import Any

import torch

from lorafed.client.train import TrainResult, train_local
from lorafed.config import RunConfig
from lorafed.data.tokens import Split, TokenizedRows
from lorafed.errors import ConfigError
from lorafed.metrics import EvalResult, evaluate
from lorafed.model.backbone import ClientModel, model_header
from lorafed.seeds import client_seed
from lorafed.threads import use_threads
from lorafed.wire.adapter import get_adapter_state, set_adapter_state
from lorafed.wire.compress import update_wire
from lorafed.wire.payload import CLIENT_ID, ModelIdentity, PayloadMeta
from lorafed.wire.roles import round_keys, round_roles, select, trainable_roles

logger = logging.getLogger(__name__)


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
    """Set this process's torch intra-op threads for ``train.num_threads`` and return the number.

    0 (auto) is this process's share of the cores among the live lorafed processes on the
    machine; an explicit number, or ``OMP_NUM_THREADS`` in the environment, wins (see
    :mod:`lorafed.threads`). Called when a client is built and again at every round.
    """
    return use_threads(num_threads).threads


def identity_of(model: ClientModel, config: RunConfig, labels: tuple[str, ...]) -> ModelIdentity:
    """The federation identity of a client model: its base fingerprint, the LoRA config, the labels."""
    return ModelIdentity(model.fingerprint, model_header(config.model), tuple(labels))


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
    set_threads(config.train.num_threads)  # a lorafed process may have started or ended since the last round
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
        t = config.train
        val = evaluate(model.model, rows, split.val, t.eval_batch_size, identity.labels, t.autocast)
    return ClientUpdate(sent, update_meta(identity, config, client_id, round_, result, val), result, val)


def check_client_id(client_id: str) -> str:
    """Return ``client_id`` if it is 1-128 characters of letters, digits, ``_``, ``.``, ``-``.

    Raises:
        ConfigError: Otherwise.
    """
    if not CLIENT_ID.match(client_id):
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

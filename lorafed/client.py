"""One client's round on its own data file: what a company runs in its own process.

``run_client_round`` reads the client's rows with the federation's label list, splits them
exactly as the simulator splits that client (seeded by the client id), starts from the global
adapter (or from the seeded fresh adapter before round 1), trains on the train part and returns
the update with its header. The caller writes it (``lorafed client train``) or sends it.
Because seeds depend only on the config seed, the round and the client id, a client process
produces the same tensors as the in-process simulation of that client.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorafed.adapter import adapter_spec, get_adapter_state, set_adapter_state
from lorafed.compress import update_wire
from lorafed.config import FederationConfig, RunConfig
from lorafed.data import TokenizedRows, load_labeled, split_indices
from lorafed.errors import ConfigError, DataError, PayloadError, PayloadValidationError
from lorafed.evaluate import EvalResult, evaluate
from lorafed.model import load_client_model, lora_config_dict
from lorafed.payload import Payload, PayloadMeta, load_payload
from lorafed.rounds import client_seed, split_seed
from lorafed.simulate import set_threads
from lorafed.specs import federation_labels
from lorafed.train import TrainResult, train_local
from lorafed.validate import UpdateSpec, validate_update

Log = Callable[[str], None]
#: Client ids travel in headers and name files: keep them to safe characters.
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass(frozen=True)
class ClientUpdate:
    """What one client's round produced.

    Attributes:
        tensors: The trained adapter tensors (fp32).
        meta: The payload header (``num_examples`` = the client's training rows).
        result: The training summary.
        validation: Scores on the client's validation rows, or ``None`` if it has none.
    """

    tensors: dict[str, torch.Tensor]
    meta: PayloadMeta
    result: TrainResult
    validation: EvalResult | None


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


def require_plain_fedavg(fcfg: FederationConfig) -> None:
    """Refuse server settings the stateless cross-silo commands (client train, aggregate) cannot honour.

    Raises:
        ConfigError: Listing every such setting, and where it is supported.
    """
    unsupported = {
        "federation.aggregation": (fcfg.aggregation, "fedavg"),
        "federation.server_optimizer": (fcfg.server_optimizer, "none"),
        "federation.robust": (fcfg.robust, "none"),
        "federation.clip_update_norm": (fcfg.clip_update_norm, None),
        "federation.dp.enabled": (fcfg.dp.enabled, False),
    }
    problems = [
        f"{key}={got!r}: the cross-silo commands (client train, aggregate) run plain FedAvg rounds (expected "
        f"{want!r}); use 'lorafed coordinate' (file drop), 'lorafed flower run' or 'lorafed simulate' for it"
        for key, (got, want) in unsupported.items()
        if got != want
    ]
    if problems:
        raise ConfigError(problems)


def run_client_round(
    config: RunConfig,
    client_id: str,
    global_path: str | Path | None = None,
    round_: int | None = None,
    progress: bool = True,
    log: Log = print,
) -> ClientUpdate:
    """Train one client's round on ``config.data.path``.

    Args:
        config: The federation's config; ``data.path`` is this client's own file.
        client_id: This client's id (seeds its split and its training, names it in the header).
        global_path: The current global adapter; ``None`` before round 1 (fresh seeded adapter).
        round_: The round; by default the global adapter's round + 1, or 1.
        progress: Show a progress bar.
        log: Where messages go.

    Raises:
        ConfigError: No label list (see :func:`~lorafed.specs.federation_labels`), bad id or round.
        DataError: The file cannot be read or leaves no training rows.
        PayloadError: The global adapter is unreadable or does not fit this config.
    """
    check_client_id(client_id)
    glob: Payload | None = load_payload(global_path) if global_path is not None else None
    labels = federation_labels(config, glob.meta if glob else None, str(global_path or "config"))
    round_ = resolve_round(round_, glob.meta if glob else None, str(global_path))
    data = load_labeled(dataclasses.replace(config.data, labels=labels), config.seed)
    for reason, count in data.dropped.items():
        log(f"{client_id}: dropped {count} rows: {reason}")
    split = split_indices(
        np.arange(len(data)), config.data.val_fraction, config.data.test_fraction, split_seed(config.seed, client_id)
    )
    if len(split.train) == 0:
        raise DataError(f"{len(data)} usable rows leave no training rows after the split", path=data.path)
    require_plain_fedavg(config.federation)
    set_threads(config.train.num_threads)
    client = load_client_model(config.model, labels, config.seed)
    fresh = get_adapter_state(client.model)
    if glob is not None:
        spec = UpdateSpec(client.fingerprint, lora_config_dict(config.model.lora), labels, adapter_spec(fresh))
        try:
            validate_update(glob, spec, str(global_path))
        except PayloadValidationError as exc:
            raise PayloadError(
                f"the global adapter does not fit this client's config: {exc}", str(global_path)
            ) from exc
        set_adapter_state(client.model, glob.decoded())
    rows = TokenizedRows(data, client.tokenizer, config.data.max_length, config.data.pair_mode)
    log(
        f"{client_id}: round {round_}, {len(data)} rows ({len(split.train)} train, {len(split.val)} validation), "
        f"{len(labels)} labels, starting from {global_path or 'the seeded fresh adapter'}"
    )
    result = train_local(
        client.model,
        rows,
        split.train,
        config.train,
        client_seed(config.seed, round_, client_id),
        desc=f"r{round_} {client_id}",
        progress=progress,
    )
    tensors = get_adapter_state(client.model)
    metrics: dict[str, float | int] = {"loss": result.mean_loss, "steps": result.steps, "seconds": result.seconds}
    val = None
    if len(split.val):
        val = evaluate(client.model, rows, split.val, config.train.eval_batch_size, labels)
        metrics.update(val_loss=val.loss, val_accuracy=val.accuracy, val_macro_f1=val.macro_f1)
    dtype, block_size = update_wire(config.federation)
    meta = PayloadMeta(
        base_fingerprint=client.fingerprint,
        lora=lora_config_dict(config.model.lora),
        labels=labels,
        num_examples=result.num_examples,
        round=round_,
        client_id=client_id,
        kind="update",
        metrics=metrics,
        dtype=dtype,
        block_size=block_size,
    )
    return ClientUpdate(tensors, meta, result, val)


def write_client_files(config: RunConfig, out_dir: str | Path, log: Log = print) -> dict[str, Path]:
    """Write each client of ``config``'s partition to its own CSV (all original columns, file order).

    For trying the cross-silo workflow on one machine: every file then plays one company's data,
    and ``run_client_round`` on it reproduces that client of the simulation.

    Returns:
        Client id -> CSV path.

    Raises:
        DataError, ConfigError: As :func:`lorafed.simulate.prepare_federation` for the data part.
    """
    from lorafed.data import read_table
    from lorafed.io import atomic_write_text
    from lorafed.partition import partition

    pc = config.partition
    data = load_labeled(config.data, config.seed, [pc.column] if pc.scheme == "natural" and pc.column else [])
    part = partition(data, pc, config.seed)
    frame = read_table(config.data.path, config.data.format, config.data.encoding)
    out: dict[str, Path] = {}
    for cid, idx in zip(part.client_ids, part.indices, strict=True):
        rows = frame.iloc[data.source_rows[idx] - 1]
        out[cid] = atomic_write_text(Path(out_dir) / f"{cid}.csv", rows.to_csv(index=False))
        log(f"{cid}: {len(rows)} rows -> {out[cid]}")
    return out

"""The shopping-guide scenarios on a prepared federation: personalization, cold start, mixed clients.

* :func:`personalize_all` loads the final global adapter of a run folder and writes each
  client's personalized adapter to ``<run>/personalized/<client>.safetensors`` (payload kind
  ``personalized``); :func:`measure_personalization` scores, per client on its own test slice,
  the global adapter, the personalized one and the client trained alone.
* :func:`cold_start` runs the federation without one client, then gives that newcomer 25, 50,
  100, 200 labelled rows: the final global adapter as is, the global adapter after a few local
  steps, and an adapter trained from the untrained one on those rows alone, all scored on the
  newcomer's test rows.
* :func:`mixed_clients` makes clients of one federation load the backbone in other precisions
  (int8 with either backend, bf16, fp32); the updates travel and are validated as any other.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafed.client.personalize import Personalized, personalize_report, personalized_meta
from lorafed.client.round import client_step, identity_of
from lorafed.config import ModelConfig, PersonalizeConfig, RunConfig
from lorafed.data.tokens import Split, TokenizedRows
from lorafed.engine.cohort import ClientFn, Cohort, evaluate_state, prepare_cohort
from lorafed.engine.compare import train_alone
from lorafed.engine.record import RunRecord, read_metrics
from lorafed.errors import ConfigError, ModelError
from lorafed.files import atomic_write_bytes, atomic_write_json
from lorafed.model.backbone import ClientModel, load_client_model
from lorafed.server.validate import validate_update
from lorafed.wire.payload import ModelIdentity, payload_to_bytes
from lorafed.wire.reader import load_payload

logger = logging.getLogger(__name__)

#: Row budgets of a cold-start newcomer.
COLD_START_SIZES: tuple[int, ...] = (25, 50, 100, 200)


@dataclass
class FedSite:
    """Client ``k`` of an in-process federation as :func:`~lorafed.client.personalize.personalize_report` sees it."""

    client_id: str
    config: RunConfig
    model: ClientModel
    rows: TokenizedRows
    split: Split
    identity: ModelIdentity


def client_site(fed: Cohort, k: int, split: Split | None = None) -> FedSite:
    """Client ``k`` of ``fed`` (with ``split`` in place of its own, e.g. a newcomer's few rows)."""
    cid = fed.partition.client_ids[k]
    return FedSite(cid, fed.config, fed.client, fed.rows, fed.splits[k] if split is None else split, fed.identity)


def final_global(fed: Cohort, run_dir: str | Path, round_: int | None = None) -> tuple[int, dict[str, torch.Tensor]]:
    """The last recorded round of ``run_dir`` (or ``round_``) and its global adapter (fp32), checked to fit ``fed``.

    Raises:
        RecordError: No ``metrics.jsonl`` in the folder (see :func:`~lorafed.engine.record.read_metrics`).
        PayloadValidationError: The adapter was made for another base, LoRA config or labels.
    """
    if round_ is None:
        rows = read_metrics(Path(run_dir) / "metrics.jsonl")
        r = int(rows[-1]["round"])
    else:
        r = int(round_)
    path = RunRecord(run_dir).global_path(r)
    payload = load_payload(path)
    validate_update(payload, fed.spec(None), str(path))
    return r, {k: v.to(torch.float32) for k, v in payload.decoded().items()}


def converged_global(
    fed: Cohort, run_dir: str | Path, rounds: int, patience: int | None
) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """Run ``fed``'s federation to convergence and return its best round's global adapter.

    The convergence protocol of :func:`~lorafed.engine.compare.run_federated`: at most ``rounds``
    rounds, stopped after ``patience`` rounds without a better macro-F1 on the pooled validation
    rows; the global adapter of the best-validation round is the one released.

    Returns:
        The best round, its global adapter (fp32) and ``run_federated``'s record of the run.
    """
    from lorafed.engine.compare import run_federated, val_positions

    res = run_federated(fed, fed.config, Path(run_dir), val_positions(fed), rounds, patience)
    r, state = final_global(fed, run_dir, res["best_round"])
    return r, state, res


def personalize_all(
    config: RunConfig,
    run_dir: str | Path,
    fed: Cohort | None = None,
    pcfg: PersonalizeConfig | None = None,
    progress: bool = False,
    round_: int | None = None,
) -> dict[str, Personalized]:
    """Personalize ``run_dir``'s final global adapter for every client into ``personalized/<client>.safetensors``.

    Args:
        config: The run's config (its partition names the clients).
        run_dir: A finished run folder.
        fed: The federation already prepared for ``config``.
        pcfg: Personalization settings (default ``config.personalize``; method ``none`` writes
            the global adapter under each client's name).
        progress: Show progress bars.
        round_: The round whose global adapter is personalized (default: the last recorded one;
            an early-stopped run releases its best-validation round).

    Returns:
        Client id -> its personalized adapter and figures.
    """
    fed = prepare_cohort(config) if fed is None else fed
    p = pcfg if pcfg is not None else config.personalize
    r, state = final_global(fed, run_dir, round_)
    out = Path(run_dir) / "personalized"
    results: dict[str, Personalized] = {}
    for k, cid in enumerate(fed.partition.client_ids):
        res = personalize_report(client_site(fed, k), state, p, progress=progress)
        atomic_write_bytes(
            out / f"{cid}.safetensors", payload_to_bytes(res.tensors, personalized_meta(fed.identity, cid, r, res))
        )
        results[cid] = res
    atomic_write_json(
        out / "summary.json",
        {
            "round": r,
            "personalize": dataclasses.asdict(p),
            "clients": {c: v.header_metrics() for c, v in results.items()},
        },
    )
    return results


def measure_personalization(
    fed: Cohort,
    global_state: dict[str, torch.Tensor],
    personalized: Mapping[str, dict[str, torch.Tensor]],
    local_only: bool = True,
    local_rounds: int | None = None,
) -> dict[str, Any]:
    """Per client, on its own test slice: global vs personalized vs trained alone (macro-F1).

    The local-only model is :func:`~lorafed.engine.compare.train_alone` on the client's train rows,
    its best checkpoint picked on the client's validation rows (its train rows when it has none).

    Args:
        fed: The federation.
        global_state: The final global adapter.
        personalized: Client id -> its personalized adapter.
        local_only: Also train each client alone.
        local_rounds: Checkpoints of the local-only model (default ``federation.rounds``).

    Returns:
        ``{"clients": {id: {"test_rows", "global", "personalized", "local_only", "gain", "errors"}},
        "mean": {...}, "worst": {...}, "gained", "max_drop", "num_clients"}`` (macro-F1 values;
        ``errors``: for ``global`` and ``personalized``, the test rows predicted wrong and, of
        those, the ones predicted as a label absent from the client's train rows, which macro-F1
        over the labels present then counts as a class of F1 0).
    """
    clients: dict[str, dict[str, Any]] = {}
    num_labels = len(fed.data.label_names)
    for k, cid in enumerate(fed.partition.client_ids):
        split = fed.splits[k]
        test = split.test
        if cid not in personalized or len(test) == 0:
            continue
        unheld = np.bincount(fed.rows.labels[torch.as_tensor(split.train)].numpy(), minlength=num_labels) == 0
        ge = evaluate_state(fed, global_state, test)
        pe = evaluate_state(fed, personalized[cid], test)
        g, p = ge.macro_f1, pe.macro_f1
        row: dict[str, Any] = {
            "test_rows": len(test),
            "global": g,
            "personalized": p,
            "gain": p - g,
            "errors": {"global": _errors(ge.confusion, unheld), "personalized": _errors(pe.confusion, unheld)},
        }
        if local_only:
            val = split.val if len(split.val) else split.train
            own = dataclasses.replace(fed, test_positions=test)
            alone = train_alone(own, split.train, cid, val, rounds=local_rounds, test_each=False)
            row["local_only"] = alone["macro_f1"]
        clients[cid] = row
    if not clients:
        raise ConfigError(["no client has test rows to measure personalization on"])
    keys = ["global", "personalized"] + (["local_only"] if local_only else [])
    gains = [c["gain"] for c in clients.values()]
    return {
        "clients": clients,
        "num_clients": len(clients),
        "mean": {k: float(np.mean([c[k] for c in clients.values()])) for k in keys},
        "worst": {k: float(np.min([c[k] for c in clients.values()])) for k in keys},
        "gained": int(sum(g > 0 for g in gains)),
        "max_drop": float(max(0.0, -min(gains))),
    }


def _errors(confusion: list[list[int]], unheld: np.ndarray) -> dict[str, int]:
    """Rows predicted wrong, and those of them predicted as an ``unheld`` label, from a confusion matrix."""
    off = np.asarray(confusion, dtype=np.int64)
    off = off - np.diag(np.diag(off))
    return {"wrong": int(off.sum()), "into_unheld": int(off[:, unheld].sum())}


def load_precision_model(fed: Cohort, model_cfg: ModelConfig) -> ClientModel:
    """A client's own model of ``fed``'s base in ``model_cfg``'s precision, checked to be the federation's base.

    Raises:
        ModelError: The model's base fingerprint differs from the federation's.
    """
    model = load_client_model(model_cfg, fed.data.label_names, fed.config.seed)
    if model.fingerprint != fed.identity.base_fingerprint:
        raise ModelError(
            f"client base {model_cfg.name_or_path} has fingerprint {model.fingerprint[:23]}..., the federation's "
            f"base is {fed.identity.base_fingerprint[:23]}...: a client must load the federation's base weights"
        )
    return model


def mixed_clients(fed: Cohort, models: Mapping[str, ModelConfig]) -> Callable[[ClientFn], ClientFn]:
    """A ``client_fn`` for :func:`~lorafed.engine.inprocess.simulate`: the named clients train on their own model.

    Each client in ``models`` loads the base with its own model section (``precision``,
    ``int8_backend``) once, on first use; the others use the federation's model. The rows are
    tokenized once (same tokenizer). A client whose model is not on the federation's base fails
    its round with the reason (:func:`load_precision_model`), and the round records it.

    Args:
        fed: The federation.
        models: Client id -> its model section (LoRA settings must be the federation's).
    """
    loaded: dict[str, ClientModel] = {}

    def wrap(base: ClientFn) -> ClientFn:
        @functools.wraps(base)
        def run(f: Cohort, state: dict[str, torch.Tensor], k: int, round_: int):  # type: ignore[no-untyped-def]
            cid = f.partition.client_ids[k]
            if cid not in models:
                return base(f, state, k, round_)
            if cid not in loaded:
                loaded[cid] = load_precision_model(f, models[cid])
            model = loaded[cid]
            ident = identity_of(model, f.config, f.data.label_names)
            up = client_step(model, f.rows, f.splits[k], state, round_, f.config, cid, ident, progress=False)
            return up.tensors, up.result

        return run

    return wrap

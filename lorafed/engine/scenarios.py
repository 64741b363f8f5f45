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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafed.client.personalize import Personalized, personalize_report, personalized_meta, sample_rows
from lorafed.client.round import client_step, identity_of
from lorafed.config import ModelConfig, PersonalizeConfig, RunConfig
from lorafed.data.tokens import Split, TokenizedRows
from lorafed.engine.compare import train_alone
from lorafed.engine.federation import ClientFn, Federation, evaluate_state, prepare_federation
from lorafed.engine.record import RunRecord, read_metrics
from lorafed.errors import ConfigError, ModelError
from lorafed.files import atomic_write_bytes, atomic_write_json
from lorafed.model.backbone import ClientModel, load_client_model
from lorafed.partition import Partition
from lorafed.seeds import client_seed
from lorafed.server.validate import validate_update
from lorafed.wire.payload import ModelIdentity, load_payload, payload_to_bytes

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


def client_site(fed: Federation, k: int, split: Split | None = None) -> FedSite:
    """Client ``k`` of ``fed`` (with ``split`` in place of its own, e.g. a newcomer's few rows)."""
    cid = fed.partition.client_ids[k]
    return FedSite(cid, fed.config, fed.client, fed.rows, fed.splits[k] if split is None else split, fed.identity)


def final_global(fed: Federation, run_dir: str | Path) -> tuple[int, dict[str, torch.Tensor]]:
    """The last recorded round of ``run_dir`` and its global adapter (fp32), checked to fit ``fed``.

    Raises:
        RecordError: No ``metrics.jsonl`` in the folder (see :func:`~lorafed.engine.record.read_metrics`).
        PayloadValidationError: The adapter was made for another base, LoRA config or labels.
    """
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    r = int(rows[-1]["round"])
    path = RunRecord(run_dir).global_path(r)
    payload = load_payload(path)
    validate_update(payload, fed.spec(None), str(path))
    return r, {k: v.to(torch.float32) for k, v in payload.decoded().items()}


def personalize_all(
    config: RunConfig,
    run_dir: str | Path,
    fed: Federation | None = None,
    pcfg: PersonalizeConfig | None = None,
    progress: bool = False,
) -> dict[str, Personalized]:
    """Personalize ``run_dir``'s final global adapter for every client into ``personalized/<client>.safetensors``.

    Args:
        config: The run's config (its partition names the clients).
        run_dir: A finished run folder.
        fed: The federation already prepared for ``config``.
        pcfg: Personalization settings (default ``config.personalize``; method ``none`` writes
            the global adapter under each client's name).
        progress: Show progress bars.

    Returns:
        Client id -> its personalized adapter and figures.
    """
    fed = prepare_federation(config) if fed is None else fed
    p = pcfg if pcfg is not None else config.personalize
    r, state = final_global(fed, run_dir)
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
    fed: Federation,
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
        ``{"clients": {id: {"test_rows", "global", "personalized", "local_only", "gain"}},
        "mean": {...}, "worst": {...}, "gained", "max_drop", "num_clients"}`` (macro-F1 values).
    """
    clients: dict[str, dict[str, Any]] = {}
    for k, cid in enumerate(fed.partition.client_ids):
        split = fed.splits[k]
        test = split.test
        if cid not in personalized or len(test) == 0:
            continue
        g = evaluate_state(fed, global_state, test).macro_f1
        p = evaluate_state(fed, personalized[cid], test).macro_f1
        row: dict[str, Any] = {"test_rows": len(test), "global": g, "personalized": p, "gain": p - g}
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


def federation_without(fed: Federation, holdout: str) -> tuple[Federation, int]:
    """``fed`` without client ``holdout`` (a newcomer that was not in the federation).

    The result shares the model and the tokenized rows; its global test rows are the other
    clients' (capped by ``federation.max_test_rows`` as in :func:`prepare_federation`).

    Returns:
        The reduced federation and the index of ``holdout`` in ``fed``.

    Raises:
        ConfigError: No such client, or too few left for ``federation.min_clients``.
    """
    ids = list(fed.partition.client_ids)
    if holdout not in ids:
        raise ConfigError([f"hold-out client {holdout!r} is not in the partition; clients: {', '.join(ids)}"])
    k = ids.index(holdout)
    keep = [i for i in range(len(ids)) if i != k]
    if len(keep) < fed.config.federation.min_clients:
        raise ConfigError(
            [
                f"without {holdout}, {len(keep)} client(s) remain, fewer than federation.min_clients="
                f"{fed.config.federation.min_clients}"
            ]
        )
    part = Partition(
        [ids[i] for i in keep],
        [fed.partition.indices[i] for i in keep],
        [*fed.partition.notes, f"client {holdout} held out of the federation"],
    )
    splits = [fed.splits[i] for i in keep]
    test = np.sort(np.concatenate([s.test for s in splits]))
    cap = fed.config.federation.max_test_rows
    if cap is not None and len(test) > cap:
        test = np.sort(np.random.default_rng(fed.config.seed).choice(test, size=cap, replace=False))
    return dataclasses.replace(fed, partition=part, splits=splits, test_positions=test), k


def cold_start(
    config: RunConfig,
    holdout: str,
    out_dir: str | Path,
    sizes: Sequence[int] = COLD_START_SIZES,
    *,
    fed: Federation | None = None,
    local_steps: int | None = None,
    alone_steps: int | None = None,
    repeats: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """A newcomer with few labelled rows: the federation's global adapter vs training alone.

    The federation runs without ``holdout`` (:func:`federation_without`, written to
    ``out_dir/federation``). For each size k, k rows are drawn from the newcomer's train rows
    (nested draws, ``repeats`` seeds) and three adapters are scored on its test rows:

    * ``global``: the final global adapter as is (needs no rows; the same for every k);
    * ``global_tuned``: the global adapter after ``local_steps`` steps of fine-tuning (LoRA and head)
      on the k rows (no validation rows: a newcomer with 25 rows keeps none back);
    * ``alone``: the untrained (round-0) adapter trained ``alone_steps`` steps on the k rows.

    Args:
        config: The federation config.
        holdout: The newcomer's client id.
        out_dir: Folder for the federation's run and ``cold_start.png``.
        sizes: Row budgets (a size above the newcomer's train rows is capped to them).
        fed: The full federation already prepared for ``config``.
        local_steps: Fine-tuning steps from the global adapter (default ``personalize.steps``).
        alone_steps: Steps of training alone (default ``rounds x train.max_steps``, what a client
            of the federation trains over the run, or ``personalize.steps``).
        repeats: Draws of the k rows per size (scores are averaged).
        progress: Show progress bars.

    Returns:
        ``{"holdout", "test_rows", "train_rows", "federation": {...}, "curve": [{"rows", "global",
        "global_tuned", "alone"}...], "seconds"}`` (macro-F1 values).
    """
    from lorafed.engine.inprocess import simulate

    t0 = time.perf_counter()
    out = Path(out_dir)
    full = prepare_federation(config) if fed is None else fed
    others, k = federation_without(full, holdout)
    summary = simulate(config, out / "federation", progress=progress, fed=others)
    _, glob = final_global(full, out / "federation")
    split = full.splits[k]
    test = split.test
    if len(test) == 0:
        raise ConfigError([f"hold-out client {holdout!r} has no test rows"])
    steps_fed = config.federation.rounds * (config.train.max_steps or config.personalize.steps)
    local_steps = config.personalize.steps if local_steps is None else local_steps
    alone_steps = steps_fed if alone_steps is None else alone_steps
    tune = PersonalizeConfig("finetune", local_steps, config.personalize.learning_rate, local_steps, None)
    alone = PersonalizeConfig("finetune", alone_steps, None, alone_steps, None)
    g_score = evaluate_state(full, glob, test).macro_f1
    curve = []
    for n in sizes:
        n_eff = min(int(n), len(split.train))
        tuned_scores, alone_scores = [], []
        for rep in range(repeats):
            rows = sample_rows(split.train, n_eff, client_seed(config.seed, rep, f"cold-start.{holdout}"))
            site = client_site(full, k, Split(rows, np.empty(0, np.int64), test))
            tuned = personalize_report(site, glob, tune, progress=progress).tensors
            tuned_scores.append(evaluate_state(full, tuned, test).macro_f1)
            scratch = personalize_report(site, full.initial_state, alone, progress=progress).tensors
            alone_scores.append(evaluate_state(full, scratch, test).macro_f1)
        point = {
            "rows": int(n),
            "rows_used": n_eff,
            "global": g_score,
            "global_tuned": float(np.mean(tuned_scores)),
            "alone": float(np.mean(alone_scores)),
        }
        curve.append(point)
        logger.info(
            "cold start %s, %d rows: global %.4f, global + %d steps %.4f, alone %.4f",
            holdout,
            n_eff,
            g_score,
            local_steps,
            point["global_tuned"],
            point["alone"],
        )
    result = {
        "holdout": holdout,
        "test_rows": len(test),
        "train_rows": len(split.train),
        "local_steps": local_steps,
        "alone_steps": alone_steps,
        "repeats": repeats,
        "federation": {"clients": list(others.partition.client_ids), "final": summary["final"]},
        "curve": curve,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    plot_cold_start(result, out / "cold_start.png")
    return result


def plot_cold_start(result: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Macro-F1 of the newcomer against its labelled rows: global, global + local steps, alone."""
    from lorafed.plots import figure, save_figure

    fig, ax = figure(figsize=(5.2, 3.6))
    xs = [c["rows"] for c in result["curve"]]
    for key, label, style in (
        ("global", "global adapter", "--"),
        ("global_tuned", f"global + {result['local_steps']} local steps", "-o"),
        ("alone", f"alone ({result['alone_steps']} steps from untrained)", "-s"),
    ):
        ax.plot(xs, [c[key] for c in result["curve"]], style, label=label)
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("labelled rows of the newcomer")
    ax.set_ylabel("macro-F1 on its test rows")
    ax.set_title(title or f"cold start: {result['holdout']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def load_precision_model(fed: Federation, model_cfg: ModelConfig) -> ClientModel:
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


def mixed_clients(fed: Federation, models: Mapping[str, ModelConfig]) -> Callable[[ClientFn], ClientFn]:
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
        def run(f: Federation, state: dict[str, torch.Tensor], k: int, round_: int):  # type: ignore[no-untyped-def]
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

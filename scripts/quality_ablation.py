"""Ablations of the client step and the server step: federated vs centralized vs local-only.

Each variant is a list of config overrides on top of a base config; the data, the partition
and the model are prepared once (and again only when a variant changes the model section).
Federated variants go through :func:`lorafed.engine.inprocess.simulate` (real payload files, the
engine's server step); ``central`` pools every client's training rows (same test rows) and
trains ``rounds x central_steps`` steps; ``local`` trains each client alone for the federated
budget of one client (rounds x max_steps). One JSON line per variant goes to ``--out``.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/quality_ablation.py \
        --config configs/retail_intents.yaml --base partition.scheme=iid partition.num_clients=5 \
        --variant 'fedavg:' --variant 'slr2:federation.server_lr=2' --out /tmp/q/iid.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lorafed.client.train import train_local
from lorafed.config import RunConfig, config_to_dict, load_config
from lorafed.engine.cohort import Cohort, evaluate_state, prepare_cohort, train_client
from lorafed.engine.inprocess import simulate
from lorafed.engine.record import read_metrics
from lorafed.seeds import client_seed
from lorafed.wire.adapter import get_adapter_state, set_adapter_state
from lorafed.wire.roles import apply_round

_CACHE: dict[str, Cohort] = {}


def federation_for(cfg: RunConfig) -> Cohort:
    """A prepared federation for ``cfg`` (reused across variants with the same data, partition, model)."""
    key = json.dumps(config_to_dict(cfg.data) | config_to_dict(cfg.partition) | {"m": config_to_dict(cfg.model)})
    if key not in _CACHE:
        if len(_CACHE) >= 3:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = prepare_cohort(cfg)
    return dataclasses.replace(_CACHE[key], config=cfg)


def run_fed(cfg: RunConfig) -> dict[str, Any]:
    fed = federation_for(cfg)
    with tempfile.TemporaryDirectory(prefix="lorafed-abl-") as tmp:
        simulate(cfg, tmp, progress=False, fed=fed)
        rows = read_metrics(Path(tmp) / "metrics.jsonl")
    k = len(fed.partition.client_ids)
    steps = cfg.train.max_steps or 0
    return {
        "curve": [round(r["macro_f1"], 4) for r in rows],
        "acc": round(rows[-1]["accuracy"], 4),
        "samples": cfg.federation.rounds * k * steps * cfg.train.batch_size,
    }


def run_central(cfg: RunConfig, steps: int) -> dict[str, Any]:
    fed = federation_for(cfg)
    pooled = np.sort(np.concatenate([s.train for s in fed.splits]))
    train = dataclasses.replace(cfg.train, max_steps=steps)
    state, curve, model = fed.initial_state, [evaluate_state(fed, fed.initial_state).macro_f1], fed.client.model
    for r in range(1, cfg.federation.rounds + 1):
        set_adapter_state(model, state)
        train_local(model, fed.rows, pooled, train, client_seed(cfg.seed, r, "centralized"), progress=False)
        state = get_adapter_state(model)
        ev = evaluate_state(fed, state)
        curve.append(ev.macro_f1)
    return {
        "curve": [round(c, 4) for c in curve],
        "acc": round(ev.accuracy, 4),
        "samples": cfg.federation.rounds * steps * cfg.train.batch_size,
        "pooled_rows": len(pooled),
    }


def run_local(cfg: RunConfig) -> dict[str, Any]:
    fed = federation_for(cfg)
    scores = {}
    for k, cid in enumerate(fed.partition.client_ids):
        state = fed.initial_state
        for r in range(1, cfg.federation.rounds + 1):
            sent, _ = train_client(fed, state, k, r, progress=False)
            state = apply_round(state, sent)
        scores[cid] = round(evaluate_state(fed, state).macro_f1, 4)
    k = len(scores)
    return {
        "per_client": scores,
        "mean": round(statistics.mean(scores.values()), 4),
        "best": max(scores.values()),
        "samples": cfg.federation.rounds * k * (cfg.train.max_steps or 0) * cfg.train.batch_size,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--base", nargs="*", default=[], help="overrides applied to every variant")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:OVERRIDE OVERRIDE ... ; NAME starting with 'central' pools the rows "
        "(central_steps=N sets its steps per round), 'local' runs local-only",
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.variant:
        name, _, rest = spec.partition(":")
        items = rest.split()
        central_steps = None
        overrides = []
        for item in items:
            if item.startswith("central_steps="):
                central_steps = int(item.split("=", 1)[1])
            else:
                overrides.append(item)
        cfg = load_config(args.config, [*args.base, *overrides])
        t = time.perf_counter()
        if name.startswith("central"):
            res = run_central(cfg, central_steps or (cfg.train.max_steps or 1))
        elif name.startswith("local"):
            res = run_local(cfg)
        else:
            res = run_fed(cfg)
        res = {"name": name, "overrides": [*args.base, *overrides], **res, "seconds": round(time.perf_counter() - t, 1)}
        line = json.dumps(res)
        print(line, flush=True)
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The server's verbs: ``aggregate`` (one cross-silo round by hand), ``coordinate`` and ``poll`` (file drop).

``aggregate`` runs the same server step as every engine
(:meth:`lorafed.server.step.RoundPolicy.try_aggregate`, via :mod:`lorafed.server.by_hand`), so
every ``federation.*`` server setting of the config applies. ``coordinate`` and ``poll`` are the
two sides of :mod:`lorafed.engine.filedrop`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lorafed.cli.common import add_output, add_overrides, add_verb, optional_config, output_folder, split_overrides
from lorafed.config import RunConfig, load_config
from lorafed.errors import AggregationError, LorafedError


def add_parsers(sub: Any) -> None:
    """Register ``aggregate``, ``coordinate`` and ``poll``."""
    agg = add_verb(
        sub,
        "aggregate",
        help="validate update files and write the next global adapter (the server step, by hand)",
        description=(
            "Validate every update (base fingerprint, LoRA config, labels, tensor names, shapes and dtypes, "
            "finite values, round, one file per client, federation.max_num_examples) against the trusted "
            "spec of the round, report each rejected file with its reason, and aggregate the valid ones "
            "with the config's server settings: federation.weighting, robust (trimmed_mean, median), "
            "clip_update_norm, dp, aggregation (ffa and rolora send a subset of the tensors) and "
            "server_optimizer (fedadam, fedyogi)."
            "\n\nThe clients started from --global (the previous global adapter: its header and tensors "
            "are the spec and the reference) or, in round 1, from the fresh adapter seeded by --config "
            "(the base is loaded to fingerprint it; labels from data.labels). Server settings come from "
            "--config; with --global alone, the defaults (sample-weighted FedAvg, min_clients 1). A server "
            "optimizer's state is read from GLOBAL_STEM.server_opt.safetensors and written beside --out; so are "
            "the clients' pinned num_examples claims (GLOBAL_STEM.claims.json: federation.max_examples_growth)."
            "\n\nWith fewer than federation.min_clients valid updates nothing is written and the exit code is 2."
        ),
        example=(
            "# round 1: the clients started from the config's seeded fresh adapter\n"
            "lorafed aggregate r1/*.safetensors --config fed.yaml federation.min_clients=2 --out g_r1.safetensors\n"
            "# round 2, coordinate-wise median of the updates\n"
            "lorafed aggregate r2/*.safetensors --global g_r1.safetensors --config fed.yaml "
            "federation.robust=median --out g_r2.safetensors"
        ),
    )
    agg.add_argument(
        "updates", nargs="+", metavar="UPDATE|KEY=VALUE", help="update files (.safetensors), then config overrides"
    )
    agg.add_argument("--out", required=True, help="where to write the new global adapter (.safetensors)")
    agg.add_argument("--global", dest="global_path", help="the previous global adapter (spec and reference)")
    agg.add_argument("--config", help="the federation's YAML config: server settings; the spec in round 1")
    agg.add_argument(
        "--expect-round", type=int, help="round every update must carry (default: --global's round + 1, else 1)"
    )
    agg.add_argument("--report", help="also write the accepted/rejected lists as JSON here")
    agg.set_defaults(func=cmd_aggregate, overrides=[])

    co = add_verb(
        sub,
        "coordinate",
        help="file-drop federation: aggregate the updates clients drop into a folder or object store",
        description=(
            "Publish global_r0.safetensors into DIR, then for each of federation.rounds rounds wait for "
            "DIR/round_N/*.safetensors until ceil(federation.fraction x N) updates arrived (N: --num-clients, "
            "default federation.min_clients) or federation.client_timeout_s passed, validate each update, "
            "aggregate with the config's server settings when federation.min_clients are valid, and publish "
            "global_rN.safetensors atomically. DIR may be an fsspec URL (s3://..., gs://...). The run record "
            "(metrics.jsonl, rounds/) goes to --out."
        ),
        example=(
            "lorafed coordinate --dir /shared/fed --config configs/tiny.yaml federation.min_clients=3 "
            "federation.client_timeout_s=1800\n"
            "lorafed poll --dir /shared/fed --config configs/tiny.yaml --client 0   # on each client"
        ),
    )
    co.add_argument("--dir", required=True, help="the drop: a folder, or an fsspec URL")
    co.add_argument("--config", required=True, help="YAML run config")
    add_overrides(co)
    co.add_argument("--num-clients", type=int, help="N, the clients taking part (default federation.min_clients)")
    co.add_argument("--poll-s", type=float, default=1.0, help="seconds between listings of the drop")
    add_output(co, "OUTPUT_DIR/NAME-coordinator", "local run record folder")
    co.set_defaults(func=cmd_coordinate)

    po = add_verb(
        sub,
        "poll",
        help="file-drop client: poll for global adapters, train on them, drop the updates",
        description=(
            "Client K of the config's partition (or, with --data-path, a client with its own file) waits for "
            "each global_rN.safetensors in DIR, validates it against its own model, trains one round and "
            "writes DIR/round_{N+1}/<client>.safetensors atomically, until done.json or federation.rounds."
        ),
        example=(
            "lorafed poll --dir /shared/fed --config configs/tiny.yaml --client 0\n"
            "lorafed poll --dir s3://bucket/fed --config fed.yaml --client 2 --data-path mine.csv --client-id shopC"
        ),
    )
    po.add_argument("--dir", required=True, help="the drop: a folder, or an fsspec URL")
    po.add_argument("--config", required=True, help="YAML run config")
    add_overrides(po)
    po.add_argument("--client", type=int, required=True, help="client index K (also picks the seed stream)")
    po.add_argument("--data-path", help="this client's own data file instead of partition slice K")
    po.add_argument("--client-id", help="name in the update header (default: the partition's client id)")
    po.add_argument("--poll-s", type=float, default=1.0, help="seconds between checks")
    po.add_argument("--timeout-s", type=float, default=3600.0, help="give up after this long without a new adapter")
    po.set_defaults(func=cmd_poll)


def _server_config(path: str | None, overrides: list[str]) -> RunConfig:
    """The config whose ``federation`` section the server step applies (defaults without ``--config``)."""
    return optional_config(path, overrides) or RunConfig()


def cmd_aggregate(args: argparse.Namespace) -> int:
    """``lorafed aggregate``."""
    from lorafed.files import atomic_write_json
    from lorafed.server.by_hand import aggregate_by_hand, start_from_config, start_from_global, write_global

    files, overrides = split_overrides(args.updates)
    overrides = [*overrides, *args.overrides]
    if not files:
        raise LorafedError("no update files given")
    if not args.global_path and not args.config:
        raise LorafedError("give --global (the previous global adapter) or, in round 1, --config")
    out = Path(args.out).resolve()
    if any(Path(p).resolve() == out for p in files):
        raise LorafedError(f"--out {args.out} is one of the update files; choose another path")
    config = _server_config(args.config, overrides)
    if args.global_path:
        start = start_from_global(args.global_path, config if args.config else None, args.expect_round)
    else:
        start = start_from_config(config, args.expect_round, args.config)
    result, policy = aggregate_by_hand(files, config, start)
    outcome = result.outcome
    for src, reason in outcome.rejected:
        print(f"rejected {src}: {reason}")
    for src, meta in outcome.accepted:
        cid = meta.client_id
        extra = f", delta norm {outcome.norms[cid]:.4g}" if cid in outcome.norms else ""
        extra += " (clipped)" if cid in outcome.clipped else ""
        print(
            f"accepted {src}: client {cid!r}, round {meta.round}, {meta.num_examples} examples, "
            f"share {outcome.shares.get(cid, 0.0):.4f}{extra}"
        )
    if args.report:
        atomic_write_json(
            args.report,
            {
                "round": start.round,
                "accepted": [
                    {
                        "file": s,
                        "client_id": m.client_id,
                        "num_examples": m.num_examples,
                        "share": outcome.shares.get(m.client_id),
                    }
                    for s, m in outcome.accepted
                ],
                "rejected": [{"file": s, "reason": r} for s, r in outcome.rejected],
            },
        )
    if result.state is None:
        need = policy.min_valid(len(files))
        raise AggregationError(
            f"{len(outcome.accepted)} valid update(s) of {len(files)}, fewer than federation.min_clients={need}; "
            f"nothing was written to {args.out}"
        )
    path, opt_path, meta = write_global(args.out, result, policy, start)
    f = config.federation
    rule = f.robust if f.robust != "none" else f"{meta.metrics['weighting']}-weighted {f.aggregation}"
    if policy.dp is not None:
        rule = f"DP-FedAvg (epsilon {result.privacy.get('epsilon', float('nan')):.3g})"
    print(
        f"round {start.round}: aggregated {len(outcome.accepted)} update(s) ({outcome.num_examples} examples, "
        f"{rule}), rejected {len(outcome.rejected)}; global adapter written to {path}"
    )
    if opt_path is not None:
        print(f"{f.server_optimizer} state written to {opt_path}")
    for cid, low in outcome.lowered.items():
        print(
            f"client {cid!r} averaged with weight {low.weight:.6g} (the others' median claim), not its claimed "
            f"{low.claimed:.6g}: cosine {low.cosine:.3f} with the others' mean update, below "
            f"federation.trust_min_cosine {f.trust_min_cosine:g} (federation.trust_weight_above)"
        )
    for cid, weight in outcome.weight_clipped.items():
        if cid not in outcome.lowered or weight != outcome.lowered[cid].weight:
            print(f"client {cid!r} averaged with weight {weight:.6g}, below its claimed num_examples")
    return 0


def cmd_coordinate(args: argparse.Namespace) -> int:
    """``lorafed coordinate``."""
    from lorafed.engine.filedrop import coordinate
    from lorafed.engine.storage import open_storage

    config = load_config(args.config, args.overrides)
    out = output_folder(args.out, Path(config.output_dir) / f"{config.name}-coordinator", args.overwrite)
    summary = coordinate(config, open_storage(args.dir), out, args.num_clients, args.poll_s)
    print(f"done: {summary['final']} in {args.dir}; record in {out}")
    return 0


def cmd_poll(args: argparse.Namespace) -> int:
    """``lorafed poll``."""
    from lorafed.engine.filedrop import poll_and_train
    from lorafed.engine.storage import open_storage

    config = load_config(args.config, args.overrides)
    n = poll_and_train(
        config, open_storage(args.dir), args.client, args.data_path, args.client_id, args.poll_s, args.timeout_s
    )
    print(f"client {args.client}: {n} round(s) trained")
    return 0

"""Command-line verbs of the cross-silo workflow: ``lorafed client train`` and ``lorafed aggregate``.

Each company runs ``client train`` on its own file and sends the update file; the server runs
``aggregate`` on the files it received. Both reuse the library: :mod:`lorafed.client.round`,
:mod:`lorafed.server.specs` and :func:`lorafed.server.step.aggregate_files`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lorafed.errors import AggregationError, LorafedError

_OVERRIDES_HELP = "config overrides as dotted key=value pairs, e.g. train.max_steps=20 model.precision=fp32"


def add_parser(sub: Any) -> None:
    """Register ``client`` (with ``train``) and ``aggregate``."""
    client = sub.add_parser(
        "client",
        help="one company's side of a cross-silo federation (client train)",
        description="Verbs run by a client on its own machine and data.",
    )
    verbs = client.add_subparsers(dest="client_verb", required=True, metavar="CLIENT_VERB")
    train = verbs.add_parser(
        "train",
        help="train one round on this client's own file and write the update",
        description=(
            "Train one client's round: read --data with the federation's label list (from --global's "
            "header, else data.labels of the config), split it as the simulator splits this client "
            "(seeded by config seed and --client-id), start from --global (or, before round 1, from the "
            "fresh adapter seeded by the config seed, identical on every client), train on the train part "
            "and write the update payload (num_examples = training rows)."
        ),
        epilog=(
            "example: lorafed client train --config configs/clothing_recommend.yaml --data mine.csv "
            "--global global_r3.safetensors --client-id shopA --out update.safetensors"
        ),
    )
    train.add_argument("--config", required=True, help="the federation's YAML config (same file on every client)")
    train.add_argument("--data", required=True, help="this client's labelled CSV, JSONL or Parquet file")
    train.add_argument("--client-id", required=True, help="this client's id (letters, digits, _ . -)")
    train.add_argument("--global", dest="global_path", help="current global adapter; omit before round 1")
    train.add_argument("--round", type=int, help="round of this update (default: the global adapter's round + 1, or 1)")
    train.add_argument("--out", required=True, help="where to write the update (.safetensors)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_OVERRIDES_HELP)
    train.set_defaults(func=_cmd_client_train)

    agg = sub.add_parser(
        "aggregate",
        help="validate update files and write their weighted FedAvg",
        description=(
            "Validate every update (base fingerprint, LoRA config, labels, tensor names, shapes and dtypes, "
            "finite values, round, one file per client) against a trusted spec, report each rejected file "
            "with its reason, and write the FedAvg of the valid ones: every tensor (LoRA A, LoRA B and the "
            "head, each separately) becomes sum_i (n_i / n) x_i, n_i = num_examples (or 1 with "
            "--weighting uniform). The spec comes from --global (the previous global adapter: its header "
            "and tensor shapes) or from --config (loads the base to fingerprint it; labels from data.labels). "
            "With fewer than --min-clients valid updates nothing is written and the exit code is 2."
        ),
        epilog=(
            "example: lorafed aggregate updates/*.safetensors --global global_r3.safetensors "
            "--out global_r4.safetensors"
        ),
    )
    agg.add_argument("updates", nargs="+", help="update files (.safetensors)")
    agg.add_argument("--out", required=True, help="where to write the new global adapter")
    source = agg.add_mutually_exclusive_group(required=True)
    source.add_argument("--global", dest="global_path", help="the previous global adapter (trusted spec)")
    source.add_argument("--config", help="the federation's YAML config (trusted spec; for round 1)")
    agg.add_argument("--expect-round", type=int, help="round every update must carry (default: --global's round + 1)")
    agg.add_argument("--min-clients", type=int, help="fewest valid updates (default: federation.min_clients or 1)")
    agg.add_argument("--weighting", choices=["samples", "uniform"], help="FedAvg weights (default: samples)")
    agg.add_argument("--report", help="also write the accepted/rejected lists as JSON here")
    agg.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (with --config)",
    )
    agg.set_defaults(func=_cmd_aggregate)


def _cmd_client_train(args: argparse.Namespace) -> int:
    from lorafed.client.round import run_client_round
    from lorafed.config import load_config
    from lorafed.wire.payload import save_payload

    # JSON is YAML, so the quoted path is read as a string whatever it looks like.
    config = load_config(args.config, [*args.overrides, f"data.path={json.dumps(args.data)}"])
    update = run_client_round(config, args.client_id, args.global_path, args.round, progress=not args.no_progress)
    path = save_payload(args.out, update.tensors, update.meta)
    m = update.meta.metrics
    val = f", validation accuracy {m['val_accuracy']:.4f}" if "val_accuracy" in m else ""
    print(
        f"{args.client_id}: round {update.meta.round}, {update.meta.num_examples} training rows, "
        f"{update.result.steps} steps, mean loss {update.result.mean_loss:.4f}{val}; "
        f"update written to {path} ({path.stat().st_size} bytes)"
    )
    return 0


def _cmd_aggregate(args: argparse.Namespace) -> int:
    from lorafed.config import load_config
    from lorafed.files import atomic_write_json
    from lorafed.server.specs import spec_from_config, spec_from_global
    from lorafed.server.step import aggregate_files
    from lorafed.wire.payload import PayloadMeta, read_meta, save_payload

    if args.overrides and not args.config:
        raise LorafedError(f"config overrides {args.overrides} need --config")
    weighting, min_clients = args.weighting or "samples", args.min_clients
    if args.global_path:
        round_ = args.expect_round if args.expect_round is not None else read_meta(args.global_path).round + 1
        spec = spec_from_global(args.global_path, round_)
    else:
        config = load_config(args.config, args.overrides)
        round_ = args.expect_round
        spec = spec_from_config(config, round_, args.config)
        weighting = args.weighting or config.federation.weighting
        min_clients = min_clients if min_clients is not None else config.federation.min_clients
    min_clients = 1 if min_clients is None else min_clients
    if min_clients < 1:
        raise LorafedError(f"--min-clients: must be >= 1, got {min_clients}")
    out = Path(args.out).resolve()
    if any(Path(p).resolve() == out for p in args.updates):
        raise LorafedError(f"--out {args.out} is one of the update files; choose another path")
    outcome = aggregate_files(args.updates, spec, weighting, min_clients)
    for src, reason in outcome.rejected:
        print(f"rejected {src}: {reason}")
    for src, meta in outcome.accepted:
        print(f"accepted {src}: client {meta.client_id!r}, round {meta.round}, {meta.num_examples} examples")
    if args.report:
        atomic_write_json(
            args.report,
            {
                "accepted": [
                    {"file": s, "client_id": m.client_id, "num_examples": m.num_examples} for s, m in outcome.accepted
                ],
                "rejected": [{"file": s, "reason": r} for s, r in outcome.rejected],
            },
        )
    if outcome.state is None:
        raise AggregationError(
            f"{len(outcome.accepted)} valid update(s) of {len(args.updates)}, fewer than --min-clients={min_clients}; "
            f"nothing was written to {args.out}"
        )
    state = outcome.state
    rounds = sorted({m.round for _, m in outcome.accepted})
    if len(rounds) > 1:
        raise AggregationError(
            f"the valid updates belong to different rounds {rounds}; pass --expect-round N. Nothing was written."
        )
    meta = PayloadMeta(
        base_fingerprint=spec.base_fingerprint,
        lora=dict(spec.lora),
        labels=spec.labels,
        num_examples=outcome.num_examples,
        round=rounds[0],
        client_id="server",
        kind="global",
        metrics={"clients": [m.client_id for _, m in outcome.accepted], "weighting": weighting},
    )
    path = save_payload(args.out, state, meta)
    print(
        f"round {rounds[0]}: averaged {len(outcome.accepted)} update(s) ({outcome.num_examples} examples, "
        f"{weighting} weighting), rejected {len(outcome.rejected)}; global adapter written to {path}"
    )
    return 0

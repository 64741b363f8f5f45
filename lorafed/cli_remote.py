"""Verbs for federations across machines: `flower ...` (Flower deployment engine), `coordinate`, `poll` (file drop)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from lorafed.config import RunConfig, config_to_dict, load_config
from lorafed.errors import LorafedError

_OVERRIDES = "config overrides as dotted key=value pairs, e.g. federation.rounds=5"


def add_parser(sub: Any) -> None:
    """Register the ``flower`` verb and its sub-verbs."""
    fl = sub.add_parser(
        "flower",
        help="federate over Flower's deployment engine (SuperLink + SuperNodes)",
        description=(
            "Run lorafed's ServerApp/ClientApp on Flower. 'run' starts a SuperLink and N SuperNodes on "
            "127.0.0.1 (insecure, for one machine) and runs the federation; 'app' writes the Flower app "
            "directory and a run-config TOML for 'flwr run' against a real deployment (see README)."
        ),
    )
    fsub = fl.add_subparsers(dest="flower_verb", required=True, metavar="SUBVERB")
    run = fsub.add_parser("run", help="local deployment on 127.0.0.1: superlink + N supernodes + the run")
    run.add_argument("--config", required=True, help="YAML run config")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_OVERRIDES)
    run.add_argument("--nodes", type=int, help="SuperNodes (default: partition.num_clients), node k = client k")
    run.add_argument("--out", help="output folder (default: OUTPUT_DIR/NAME-flower)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds the whole run may take")
    run.add_argument("--round-timeout", type=float, default=600.0, help="seconds to wait for a round's replies")
    run.add_argument("--no-server-eval", action="store_true", help="skip evaluating the global adapter")
    run.add_argument(
        "--isolation", choices=["subprocess", "process"], default="subprocess",
        help="subprocess: stock Flower, one flwr-clientapp process per message; process: one long-lived "
        "ClientApp executor per SuperNode (keeps imports and the loaded model between rounds)",
    )  # fmt: skip
    run.set_defaults(func=_cmd_run)
    app = fsub.add_parser("app", help="write the Flower app directory (and a run-config TOML) for 'flwr run'")
    app.add_argument("--out", required=True, help="app directory to write")
    app.add_argument("--config", help="YAML run config to embed in OUT/run_config.toml")
    app.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_OVERRIDES)
    app.add_argument("--nodes", type=int, default=2, help="SuperNodes the ServerApp waits for")
    app.add_argument("--run-out", default="lorafed-flower-run", help="output folder on the SuperLink machine")
    app.set_defaults(func=_cmd_app)

    co = sub.add_parser(
        "coordinate",
        help="file-drop federation: aggregate the updates clients drop into a folder or object store",
        description=(
            "Publish global_r0.safetensors into DIR, then for each round N wait for DIR/round_N/*.safetensors "
            "until ceil(fraction x N) updates arrived (N: --num-clients, default federation.min_clients) or "
            "federation.client_timeout_s passed, validate each update, aggregate when federation.min_clients "
            "are valid, and publish global_rN.safetensors atomically. DIR may be an fsspec URL "
            "(s3://..., gs://...). A local record goes to --out."
        ),
        epilog="example: lorafed coordinate --dir /shared/fed --config configs/tiny.yaml federation.min_clients=3",
    )
    co.add_argument("--dir", required=True, help="the drop: a folder, or an fsspec URL")
    co.add_argument("--config", required=True, help="YAML run config")
    co.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_OVERRIDES)
    co.add_argument("--num-clients", type=int, help="N, the clients taking part (default federation.min_clients)")
    co.add_argument("--poll-s", type=float, default=1.0, help="seconds between listings of the drop")
    co.add_argument("--out", help="local record folder (default OUTPUT_DIR/NAME-coordinator)")
    co.set_defaults(func=_cmd_coordinate)

    po = sub.add_parser(
        "poll",
        help="file-drop client: poll for global adapters, train on them, drop the updates",
        description=(
            "Client K of the config's partition (or, with --data-path, a client with its own file) waits for "
            "each global_rN.safetensors in DIR, validates it against its own model, trains one round and "
            "writes DIR/round_{N+1}/<client>.safetensors atomically, until done.json or federation.rounds."
        ),
    )
    po.add_argument("--dir", required=True, help="the drop: a folder, or an fsspec URL")
    po.add_argument("--config", required=True, help="YAML run config")
    po.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_OVERRIDES)
    po.add_argument("--client", type=int, required=True, help="client index K (also picks the seed stream)")
    po.add_argument("--data-path", help="this client's own data file instead of partition slice K")
    po.add_argument("--client-id", help="name in the update header (default: the partition's client id)")
    po.add_argument("--poll-s", type=float, default=1.0, help="seconds between checks")
    po.add_argument("--timeout-s", type=float, default=3600.0, help="give up after this long without a new adapter")
    po.set_defaults(func=_cmd_poll)


def resolved_yaml(config: RunConfig) -> str:
    """The config as YAML text, with a relative data path or model folder made absolute (apps run elsewhere)."""
    data_path = str(Path(config.data.path).resolve())
    model = config.model.name_or_path
    if Path(model).exists():
        model = str(Path(model).resolve())
    config = dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, path=data_path),
        model=dataclasses.replace(config.model, name_or_path=model),
    )
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def default_nodes(config: RunConfig, nodes: int | None) -> int:
    """--nodes, or the number of clients of an iid/dirichlet partition."""
    if nodes is not None:
        if nodes < 1:
            raise LorafedError(f"--nodes: must be >= 1, got {nodes}")
        return nodes
    if config.partition.scheme == "natural":
        raise LorafedError("--nodes: required with partition.scheme natural (the client count depends on the data)")
    return config.partition.num_clients


def _cmd_run(args: argparse.Namespace) -> int:
    from lorafed.engine.flower.app_dir import write_app_dir, write_run_config
    from lorafed.engine.flower.deploy import LocalDeployment

    config = load_config(args.config, args.overrides)
    nodes = default_nodes(config, args.nodes)
    out = (Path(args.out) if args.out else Path(config.output_dir) / f"{config.name}-flower").resolve()
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise LorafedError(f"output folder {out} already exists; pass --overwrite or --out ELSEWHERE")
        shutil.rmtree(out)
    work = out / "flower"
    app_dir = write_app_dir(work / "app")
    run_config = write_run_config(
        work / "run_config.toml",
        {
            "config-yaml": resolved_yaml(config),
            "out-dir": str(out),
            "num-nodes": nodes,
            "round-timeout": args.round_timeout,
            "server-eval": not args.no_server_eval,
        },
    )
    node_configs = [f"partition-id={i} num-partitions={nodes}" for i in range(nodes)]
    with LocalDeployment(work, node_configs, isolation=args.isolation) as dep:
        print(f"SuperLink on 127.0.0.1:{dep.link_port}, {nodes} SuperNodes; listening: {', '.join(dep.listeners())}")
        info = dep.run_app(app_dir, run_config, out / "summary.json", args.timeout)
    print(f"run {info['run_id']}: {info['status']}; results in {out} (logs in {work / 'logs'})")
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        acc = f"accuracy {row['accuracy']:.4f}" if "accuracy" in row else ""
        print(f"round {row['round']}: {len(row['clients'])} clients {acc} {row.get('seconds', {})}")
    return 0


def _cmd_app(args: argparse.Namespace) -> int:
    from lorafed.engine.flower.app_dir import write_app_dir, write_run_config

    app_dir = write_app_dir(args.out)
    print(f"Flower app written to {app_dir}")
    if args.config:
        config = load_config(args.config, args.overrides)
        rc = write_run_config(
            app_dir / "run_config.toml",
            {"config-yaml": resolved_yaml(config), "out-dir": args.run_out, "num-nodes": args.nodes},
        )
        print(f"run config: {rc}\nsubmit with: flwr run {app_dir} <connection> --run-config {rc}")
    return 0


def _cmd_coordinate(args: argparse.Namespace) -> int:
    from lorafed.engine.filedrop import coordinate
    from lorafed.engine.storage import open_storage

    config = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(config.output_dir) / f"{config.name}-coordinator"
    summary = coordinate(config, open_storage(args.dir), out, args.num_clients, args.poll_s)
    print(f"done: {summary['final']} in {args.dir}; record in {out}")
    return 0


def _cmd_poll(args: argparse.Namespace) -> int:
    from lorafed.engine.filedrop import poll_and_train
    from lorafed.engine.storage import open_storage

    config = load_config(args.config, args.overrides)
    n = poll_and_train(
        config, open_storage(args.dir), args.client, args.data_path, args.client_id, args.poll_s, args.timeout_s
    )
    print(f"client {args.client}: {n} round(s) trained")
    return 0

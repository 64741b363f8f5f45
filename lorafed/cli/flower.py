"""Flower deployment engine verbs: ``flower run`` (a local deployment) and ``flower app`` (for ``flwr run``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from lorafed.cli.common import add_output, add_overrides, add_verb, optional_config, output_folder
from lorafed.config import RunConfig, config_to_dict, load_config
from lorafed.errors import LorafedError


def add_parsers(sub: Any) -> None:
    """Register the ``flower`` verb and its sub-verbs ``run`` and ``app``."""
    fl = sub.add_parser(
        "flower",
        help="federate over Flower's deployment engine (SuperLink + SuperNodes)",
        description=(
            "Run lorafed's ServerApp/ClientApp on Flower. 'run' starts a SuperLink and N SuperNodes on "
            "127.0.0.1 (TLS + SuperNode authentication, for one machine) and runs the federation; 'app' "
            "writes the Flower app "
            "directory and a run-config TOML for 'flwr run' against a real deployment (see README)."
        ),
        epilog="example:\n  lorafed flower run --config configs/tiny.yaml --nodes 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fsub = fl.add_subparsers(dest="subverb", required=True, metavar="SUBVERB")
    run = add_verb(
        fsub,
        "run",
        help="local deployment on 127.0.0.1: superlink + N supernodes + the run",
        description=(
            "Start a SuperLink and --nodes SuperNodes on 127.0.0.1 (node k is client k of the config's "
            "partition), run the federation on them and write the run folder (config.yaml, metrics.jsonl, "
            "rounds/) plus flower/ (the app, its run config and each process's log)."
            "\n\nEverything is TLS with SuperNode authentication, as across companies: flower/tls/ gets a "
            "test CA, a server certificate for 127.0.0.1 and one ECDSA P-384 key per node; the SuperLink "
            "runs with --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile --enable-supernode-auth, each node's "
            "public key is registered ('flwr supernode register') before it starts with "
            "--root-certificates and --auth-supernode-private-key. --insecure (debugging only) drops both."
            "\n\nA round waits federation.client_timeout_s for its replies (default 600 s here); "
            "like every engine setting it is a config key, not a flag."
        ),
        example=(
            "lorafed flower run --config configs/tiny.yaml --nodes 3 federation.rounds=2 "
            "federation.client_timeout_s=60\n"
            "lorafed flower run --config configs/tiny.yaml --isolation process   # keep each node's model loaded"
        ),
    )
    run.add_argument("--config", required=True, help="YAML run config")
    add_overrides(run)
    run.add_argument("--nodes", type=int, help="SuperNodes (default: partition.num_clients), node k = client k")
    add_output(run, "OUTPUT_DIR/NAME-flower", "run folder")
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds the whole run may take")
    run.add_argument("--no-server-eval", action="store_true", help="skip evaluating the global adapter")
    run.add_argument(
        "--isolation", choices=["subprocess", "process"], default="subprocess",
        help="subprocess: stock Flower, one flwr-clientapp process per message; process: one long-lived "
        "ClientApp executor per SuperNode (keeps imports and the loaded model between rounds)",
    )  # fmt: skip
    run.add_argument(
        "--insecure", action="store_true",
        help="debugging only: plaintext HTTP and no SuperNode authentication (any local process may join)",
    )  # fmt: skip
    run.set_defaults(func=cmd_run)
    app = add_verb(
        fsub,
        "app",
        help="write the Flower app directory (and a run-config TOML) for 'flwr run'",
        description=(
            "Write the Flower app directory (pyproject.toml naming lorafed's ServerApp and ClientApp) to "
            "--out and, with --config, OUT/run_config.toml embedding the resolved config (relative data "
            "and model paths made absolute). Submit it with 'flwr run' to a real deployment whose "
            "SuperNodes each have --node-config partition-id=K (or data-path=FILE)."
        ),
        example=(
            "lorafed flower app --out fed-app --config configs/clothing_recommend.yaml --nodes 6 "
            "--run-out /srv/runs/clothing\n"
            "flwr run fed-app my-federation --run-config fed-app/run_config.toml"
        ),
    )
    add_output(app, None, "app directory to write")
    app.add_argument("--config", help="YAML run config to embed in OUT/run_config.toml")
    add_overrides(app)
    app.add_argument("--nodes", type=int, default=2, help="SuperNodes the ServerApp waits for")
    app.add_argument("--run-out", default="lorafed-flower-run", help="output folder on the SuperLink machine")
    app.set_defaults(func=cmd_app)


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


def cmd_run(args: argparse.Namespace) -> int:
    """``lorafed flower run``."""
    from lorafed.engine.flower.app_dir import write_app_dir, write_run_config
    from lorafed.engine.flower.deploy import LocalDeployment

    config = load_config(args.config, args.overrides)
    nodes = default_nodes(config, args.nodes)
    out = output_folder(args.out, Path(config.output_dir) / f"{config.name}-flower", args.overwrite)
    work = out / "flower"
    app_dir = write_app_dir(work / "app")
    run_config = write_run_config(
        work / "run_config.toml",
        {
            "config-yaml": resolved_yaml(config),
            "out-dir": str(out),
            "num-nodes": nodes,
            "server-eval": not args.no_server_eval,
        },
    )
    node_configs = [f"partition-id={i} num-partitions={nodes}" for i in range(nodes)]
    if args.insecure:
        print(
            "WARNING: --insecure: plaintext HTTP and no SuperNode authentication; for debugging on one machine only",
            file=sys.stderr,
        )
    with LocalDeployment(work, node_configs, isolation=args.isolation, secure=not args.insecure) as dep:
        mode = "TLS + SuperNode auth" if dep.certs else "INSECURE"
        print(
            f"SuperLink on 127.0.0.1:{dep.link_port} ({mode}), {nodes} SuperNodes; "
            f"listening: {', '.join(dep.listeners())}"
        )
        info = dep.run_app(app_dir, run_config, out / "summary.json", args.timeout)
    print(f"run {info['run_id']}: {info['status']}; results in {out} (logs in {work / 'logs'})")
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        # Every row has the key; it is null when the server has no test rows (server-eval off).
        acc = f"accuracy {row['accuracy']:.4f}" if row.get("accuracy") is not None else ""
        print(f"round {row['round']}: {len(row['clients'])} clients {acc} {row.get('seconds', {})}")
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    """``lorafed flower app``."""
    from lorafed.engine.flower.app_dir import write_app_dir, write_run_config

    config = optional_config(args.config, args.overrides)
    app_dir = write_app_dir(output_folder(args.out, None, args.overwrite))
    print(f"Flower app written to {app_dir}")
    if config is not None:
        rc = write_run_config(
            app_dir / "run_config.toml",
            {"config-yaml": resolved_yaml(config), "out-dir": args.run_out, "num-nodes": args.nodes},
        )
        print(f"run config: {rc}\nsubmit with: flwr run {app_dir} <connection> --run-config {rc}")
    return 0

"""The ``lorafed`` command line.

Each verb parses its arguments, calls the library and prints. Input errors
(:class:`~lorafed.errors.LorafedError`) print one message and give exit code 2.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from lorafed import cli_download, cli_remote
from lorafed.cli_silo import add_silo_verbs
from lorafed.config import load_config
from lorafed.errors import LorafedError

EXIT_INPUT_ERROR = 2

_OVERRIDES_HELP = (
    "config overrides as dotted key=value pairs, values parsed as YAML, e.g. "
    "federation.rounds=5 train.max_steps=20 model.precision=fp32 data.max_rows=2000"
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every verb."""
    parser = argparse.ArgumentParser(
        prog="lorafed",
        description=(
            "Federated LoRA fine-tuning of BERT-family classifiers. Each client keeps a frozen "
            "(8-bit by default) backbone and trains only LoRA adapters and the classifier head; "
            "only those tensors travel, as safetensors, and the server averages them with "
            "sample-weighted FedAvg."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'lorafed VERB --help' for the options of each verb.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    sim = sub.add_parser(
        "simulate",
        help="run a whole federation in this process (all clients and the server)",
        description=(
            "Run R rounds in-process: sample clients, train each from the global adapter, write "
            "their payloads, validate and aggregate them, and evaluate the global adapter on the "
            "held-out test rows (round 0 is the untrained adapter). Results go to "
            "OUTPUT_DIR/NAME/ (config.yaml, metrics.jsonl, summary.json, metrics.png, rounds/)."
        ),
        epilog="example: lorafed simulate --config configs/clothing_recommend.yaml federation.rounds=2",
    )
    sim.add_argument("--config", help="YAML run config (see configs/); with --resume, default RUN_DIR/config.yaml")
    sim.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_OVERRIDES_HELP)
    sim.add_argument("--out", help="output folder (default: OUTPUT_DIR/NAME from the config)")
    sim.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    sim.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sim.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR after its last completed round (an interrupted round is redone)",
    )
    sim.set_defaults(func=_cmd_simulate)

    part = sub.add_parser(
        "partition",
        help="show how a config deals rows to clients, without training",
        description="Load the data of a config and print the client sizes and label histograms.",
    )
    part.add_argument("--config", required=True, help="YAML run config")
    part.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_OVERRIDES_HELP)
    part.set_defaults(func=_cmd_partition)

    insp = sub.add_parser(
        "inspect",
        help="show a payload's header and tensors; with --config, check it fits that federation",
        description=(
            "Print a payload's lorafed header (base fingerprint, LoRA config, labels, num_examples, round, "
            "client) and its tensors. With --config, also load that config's base model and labels and "
            "validate the payload against them, as the server would (exit code 2 if it would be refused)."
        ),
    )
    insp.add_argument("payload", help="a .safetensors payload file")
    insp.add_argument("--config", help="YAML run config whose federation the payload should fit")
    insp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_OVERRIDES_HELP)
    insp.set_defaults(func=_cmd_inspect)
    cli_download.add_parser(sub)
    add_silo_verbs(sub)
    cli_remote.add_parser(sub)  # flower, coordinate, poll
    return parser


def _cmd_simulate(args: argparse.Namespace) -> int:
    from lorafed.engine.inprocess import simulate

    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            msg = f"{run_dir}: no config.yaml, so not a run folder; start one with 'lorafed simulate --config'"
            raise LorafedError(msg)
        config = load_config(args.config or saved, args.overrides)
        summary = simulate(config, run_dir, progress=not args.no_progress, resume=True)
        print(f"results in {summary['output_dir']}")
        return 0
    if not args.config:
        raise LorafedError("simulate: --config is required (or --resume RUN_DIR)")
    config = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(config.output_dir) / config.name
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise LorafedError(f"output folder {out} already exists; pass --overwrite or --out ELSEWHERE")
        shutil.rmtree(out)
    summary = simulate(config, out, progress=not args.no_progress)
    print(f"results in {summary['output_dir']}")
    return 0


def _cmd_partition(args: argparse.Namespace) -> int:
    from lorafed.data.clean import load_labeled
    from lorafed.partition import client_table, partition

    config = load_config(args.config, args.overrides)
    pc = config.partition
    data = load_labeled(config.data, config.seed, [pc.column] if pc.scheme == "natural" and pc.column else [])
    for reason, count in data.dropped.items():
        print(f"dropped {count} rows: {reason}")
    print(client_table(partition(data, pc, config.seed), data.labels, data.label_names))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from lorafed.wire.payload import load_payload

    payload = load_payload(args.payload)
    m = payload.meta
    print(f"{args.payload}: {m.kind} payload, format v{m.format_version}")
    for key in ("client_id", "round", "num_examples", "dtype", "base_fingerprint"):
        print(f"  {key:<16} {getattr(m, key)}")
    print(f"  {'lora':<16} {m.lora}")
    print(f"  {'labels':<16} {len(m.labels)}: {', '.join(m.labels[:10])}{' ...' if len(m.labels) > 10 else ''}")
    total = sum(t.numel() for t in payload.tensors.values())
    print(f"  tensors          {len(payload.tensors)} ({total:,} values)")
    if args.config:
        from lorafed.data.clean import load_labeled
        from lorafed.model.backbone import load_client_model, lora_config_dict
        from lorafed.server.validate import UpdateSpec, validate_update
        from lorafed.wire.adapter import adapter_spec, get_adapter_state

        config = load_config(args.config, args.overrides)
        labels = config.data.labels or load_labeled(config.data, config.seed).label_names
        client = load_client_model(config.model, labels, config.seed)
        spec = UpdateSpec(
            base_fingerprint=client.fingerprint,
            lora=lora_config_dict(config.model.lora),
            labels=tuple(labels),
            tensors=adapter_spec(get_adapter_state(client.model)),
        )
        validate_update(payload, spec, args.payload)
        print(f"valid for {args.config}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run a verb and return the exit code (2 for input errors)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may follow options (argparse stops filling a positional list at them).
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args))
    except LorafedError as exc:
        print(f"lorafed {args.verb}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

"""Verbs of a whole run in one process: ``simulate``, ``partition``, ``inspect``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lorafed.cli.common import add_output, add_overrides, add_verb, output_folder
from lorafed.config import load_config
from lorafed.errors import LorafedError


def add_parsers(sub: Any) -> None:
    """Register ``simulate``, ``partition`` and ``inspect``."""
    sim = add_verb(
        sub,
        "simulate",
        help="run a whole federation in this process (all clients and the server)",
        description=(
            "Run federation.rounds rounds in-process: sample clients, train each from the global adapter, "
            "write their payloads, validate and aggregate them with the federation's server settings, and "
            "evaluate the global adapter on the held-out test rows (round 0 is the untrained adapter). "
            "Results go to OUTPUT_DIR/NAME/ (config.yaml, metrics.jsonl, summary.json, metrics.png, rounds/)."
            "\n\nEvery setting is a config key: change one with KEY=VALUE after the verb, e.g. "
            "federation.rounds=5 federation.min_clients=2 train.max_steps=20."
        ),
        example=(
            "lorafed simulate --config configs/clothing_recommend.yaml federation.rounds=2 train.max_steps=10\n"
            "lorafed simulate --resume results/clothing_recommend federation.rounds=5   # two more rounds"
        ),
    )
    sim.add_argument("--config", help="YAML run config (see configs/); with --resume, default RUN_DIR/config.yaml")
    add_overrides(sim)
    add_output(sim, "OUTPUT_DIR/NAME from the config", "run folder")
    sim.add_argument("--no-progress", action="store_true", help="hide progress bars (shown on a terminal only)")
    sim.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR after its last completed round (an interrupted round is redone)",
    )
    sim.set_defaults(func=cmd_simulate)

    cmp = add_verb(
        sub,
        "compare",
        help="federated vs centralized (pooled rows) vs each client alone, on the same test rows",
        description=(
            "Prepare the config's federation once, then train three ways from the same seeded adapter: "
            "the federation itself; one model on every client's training rows pooled (what pooling the "
            "data would give); and each client alone on its own rows. The baselines train federation.rounds "
            "checkpoints of train.max_steps steps each, the sequential progress the federation makes. Every "
            "model is scored on the same test rows, and each reports its best checkpoint on the pooled "
            "validation rows (early stopping). Writes OUT/compare.json and OUT/federated/ (a run folder)."
        ),
        example=(
            "lorafed compare --config configs/clothing_recommend.yaml          # the README's main job\n"
            "lorafed compare --config my_federation.yaml federation.rounds=10  # your data, same baselines"
        ),
    )
    cmp.add_argument("--config", required=True, help="YAML run config")
    add_overrides(cmp)
    add_output(cmp, "OUTPUT_DIR/NAME-compare from the config", "output folder")
    cmp.add_argument("--no-progress", action="store_true", help="hide progress bars (shown on a terminal only)")
    cmp.set_defaults(func=cmd_compare)

    pers = add_verb(
        sub,
        "personalize",
        help="after a simulated federation: each client's own adapter (global + a local part)",
        description=(
            "Load RUN_DIR's final global adapter and personalize it for every client of the config's "
            "partition, as personalize.* says ('finetune': a short local fine-tune; 'local_head': FedRep-style, "
            "only the head retrained; 'prior': the head's bias shifted by the client's own label prior). Each "
            "client keeps the global adapter unless its validation rows show the change helps (prior: does no "
            "harm beyond personalize.prior_margin). Writes RUN_DIR/personalized/<client>.safetensors and summary.json."
        ),
        example=(
            "lorafed personalize --config configs/retail_intents_dirichlet.yaml results/retail_intents_dirichlet "
            "personalize.method=finetune personalize.steps=20"
        ),
    )
    pers.add_argument("run_dir", help="a finished run folder (lorafed simulate)")
    pers.add_argument("--config", help="YAML run config (default RUN_DIR/config.yaml)")
    add_overrides(pers)
    pers.set_defaults(func=cmd_personalize)

    part = add_verb(
        sub,
        "partition",
        help="show how a config deals rows to clients, without training",
        description=(
            "Load the data of a config, deal its rows to clients as partition.* says, and print each "
            "client's size and label histogram. Use it to see how skewed a dirichlet partition is "
            "before you spend time training on it."
        ),
        example="lorafed partition --config configs/retail_intents.yaml partition.scheme=dirichlet partition.alpha=0.1",
    )
    part.add_argument("--config", required=True, help="YAML run config")
    add_overrides(part)
    part.set_defaults(func=cmd_partition)

    insp = add_verb(
        sub,
        "inspect",
        help="show a payload's header and tensors; with --config, check it fits that federation",
        description=(
            "Print a payload's lorafed header (base fingerprint, LoRA config, labels, num_examples, round, "
            "client) and its tensors. With --config, also load that config's base model and labels and "
            "validate the payload against them, as the server would (exit code 2 if it would be refused)."
        ),
        example=(
            "lorafed inspect results/clothing_recommend/rounds/global_r5.safetensors\n"
            "lorafed inspect update.safetensors --config configs/clothing_recommend.yaml   # would it be accepted?\n"
            "lorafed inspect results/clothing_recommend/rounds/global_r5.safetensors --lineage   # where it came from"
        ),
    )
    insp.add_argument("payload", help="a .safetensors payload file")
    insp.add_argument("--config", help="YAML run config whose federation the payload should fit")
    insp.add_argument(
        "--lineage", action="store_true", help="walk a global adapter's parents back to round 0 (by sha256)"
    )
    insp.add_argument(
        "--search", action="append", default=[], metavar="DIR", help="more folders to look for parents in (repeatable)"
    )
    add_overrides(insp)
    insp.set_defaults(func=cmd_inspect)


def cmd_simulate(args: argparse.Namespace) -> int:
    """``lorafed simulate``."""
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
        raise LorafedError("--config is required (or --resume RUN_DIR)")
    config = load_config(args.config, args.overrides)
    out = output_folder(args.out, Path(config.output_dir) / config.name, args.overwrite)
    summary = simulate(config, out, progress=not args.no_progress)
    print(f"results in {summary['output_dir']}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``lorafed compare``."""
    from lorafed.engine.compare import compare, format_compare

    config = load_config(args.config, args.overrides)
    out = output_folder(args.out, Path(config.output_dir) / f"{config.name}-compare", args.overwrite)
    result = compare(config, out, progress=not args.no_progress)
    print(format_compare(result))
    print(f"results in {out}")
    return 0


def cmd_personalize(args: argparse.Namespace) -> int:
    """``lorafed personalize``."""
    from lorafed.engine.scenarios import personalize_all

    run_dir = Path(args.run_dir)
    saved = run_dir / "config.yaml"
    if not args.config and not saved.is_file():
        raise LorafedError(f"{run_dir}: no config.yaml, so not a run folder; pass --config or run 'lorafed simulate'")
    config = load_config(args.config or saved, args.overrides)
    if config.personalize.method == "none":
        raise LorafedError("personalize.method is none; pass personalize.method=finetune, local_head or prior")
    results = personalize_all(config, run_dir)
    for cid, r in results.items():
        gain = "" if r.val_global is None or r.val_best is None else f"  val {r.val_global:.4f} -> {r.val_best:.4f}"
        print(f"{cid}: checkpoint after {r.best_step} step(s){gain}")
    print(f"personalized adapters in {run_dir / 'personalized'}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    """``lorafed partition``."""
    from lorafed.data.clean import load_labeled
    from lorafed.partition import client_table, partition

    config = load_config(args.config, args.overrides)
    pc = config.partition
    data = load_labeled(config.data, config.seed, [pc.column] if pc.scheme == "natural" and pc.column else [])
    for reason, count in data.dropped.items():
        print(f"dropped {count} rows: {reason}")
    print(client_table(partition(data, pc, config.seed), data.labels, data.label_names))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """``lorafed inspect``."""
    from lorafed.wire.reader import load_payload

    payload = load_payload(args.payload)
    m = payload.meta
    print(f"{args.payload}: {m.kind} payload, format v{m.format_version}")
    for key in ("client_id", "round", "num_examples", "dtype", "base_fingerprint"):
        print(f"  {key:<16} {getattr(m, key)}")
    print(f"  {'lora':<16} {m.lora}")
    print(f"  {'labels':<16} {len(m.labels)}: {', '.join(m.labels[:10])}{' ...' if len(m.labels) > 10 else ''}")
    total = sum(t.numel() for t in payload.tensors.values())
    print(f"  tensors          {len(payload.tensors)} ({total:,} values)")
    if m.metrics:
        print(f"  {'metrics':<16} {m.metrics}")
    if args.lineage:
        from lorafed.engine.record import lineage

        print("lineage (newest first):")
        for path, fields in lineage(args.payload, args.search):
            parent = (
                f"parent {fields['parent'][:12]}... (round {fields['parent_round']})" if fields["parent"] else "root"
            )
            print(f"  round {fields['round']:>3}  run {fields['run']}  {parent}  {path}")
    if args.config:
        from lorafed.data.clean import load_labeled
        from lorafed.server.specs import federation_base, round_spec
        from lorafed.server.validate import validate_update

        config = load_config(args.config, args.overrides)
        labels = config.data.labels or load_labeled(config.data, config.seed).label_names
        identity, fresh = federation_base(config, labels)
        # An update carries its round's tensors only (FFA/RoLoRA send a subset); a global carries all.
        round_ = m.round if m.kind == "update" else None
        validate_update(payload, round_spec(identity, fresh, config.federation.aggregation, round_), args.payload)
        print(f"valid for {args.config}")
    elif args.overrides:
        raise LorafedError(f"config overrides {args.overrides} need --config")
    return 0

"""A company's side of a cross-silo round: ``lorafed client train``.

Each company runs ``client train`` on its own file and sends the update file; the server runs
``lorafed aggregate`` (:mod:`lorafed.cli.server`) on the files it received. The round itself is
:func:`lorafed.client.local.run_client_round`, the same client step every engine runs.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from lorafed.cli.common import add_overrides, add_verb


def add_parsers(sub: Any) -> None:
    """Register ``client`` with its sub-verb ``train``."""
    client = sub.add_parser(
        "client",
        help="one company's side of a cross-silo federation (client train)",
        description="Verbs run by a client on its own machine and data.",
        epilog="example:\n  lorafed client train --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = client.add_subparsers(dest="subverb", required=True, metavar="CLIENT_VERB")
    train = add_verb(
        verbs,
        "train",
        help="train one round on this client's own file and write the update",
        description=(
            "Train one client's round: read --data with the federation's label list (from --global's "
            "header, else data.labels of the config), split it as the simulator splits this client "
            "(seeded by the config seed and --client-id), start from --global (or, before round 1, from the "
            "fresh adapter seeded by the config seed, identical on every client), train on the train part "
            "and write the update payload (num_examples = training rows), encoded as federation.transport."
            "\n\nEvery company uses the same config file; send the update file to whoever runs "
            "'lorafed aggregate'."
        ),
        example=(
            "# round 1 (no global adapter yet; the label list comes from the config)\n"
            "lorafed client train --config fed.yaml --data mine.csv --client-id shopA "
            "--out r1/shopA.safetensors 'data.labels=[bad,good]'\n"
            "# later rounds start from the global adapter the server sent back\n"
            "lorafed client train --config fed.yaml --data mine.csv --client-id shopA "
            "--global global_r1.safetensors --out r2/shopA.safetensors\n"
            "# signed: verify the global with the registry, sign the update (writes r2/shopA.safetensors.sig)\n"
            "lorafed client train --config fed.yaml --data mine.csv --client-id shopA --global global_r1.safetensors "
            "--out r2/shopA.safetensors federation.signing.registry=registry.json "
            "federation.signing.client_key=keys/shopA.key"
        ),
    )
    train.add_argument("--config", required=True, help="the federation's YAML config (same file on every client)")
    train.add_argument("--data", required=True, help="this client's labelled CSV, JSONL or Parquet file")
    train.add_argument("--client-id", required=True, help="this client's id (letters, digits, _ . -)")
    train.add_argument("--global", dest="global_path", help="current global adapter; omit before round 1")
    train.add_argument("--round", type=int, help="round of this update (default: the global adapter's round + 1, or 1)")
    train.add_argument("--out", required=True, help="where to write the update (.safetensors)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar (shown on a terminal only)")
    add_overrides(train)
    train.set_defaults(func=cmd_client_train)


def cmd_client_train(args: argparse.Namespace) -> int:
    """``lorafed client train``."""
    from lorafed.client.local import run_client_round, write_update
    from lorafed.config import load_config

    # JSON is YAML, so the quoted path is read as a string whatever it looks like.
    config = load_config(args.config, [*args.overrides, f"data.path={json.dumps(args.data)}"])
    update = run_client_round(config, args.client_id, args.global_path, args.round, progress=not args.no_progress)
    path, sig = write_update(config, args.client_id, update, args.out)
    m = update.meta.metrics
    val = f", validation accuracy {m['val_accuracy']:.4f}" if "val_accuracy" in m else ""
    print(
        f"{args.client_id}: round {update.meta.round}, {update.meta.num_examples} training rows, "
        f"{update.result.steps} steps, mean loss {update.result.mean_loss:.4f}{val}; "
        f"update written to {path} ({path.stat().st_size} bytes)" + (f", signature {sig}" if sig else "")
    )
    return 0

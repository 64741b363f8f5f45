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
from lorafed.errors import LorafedError


def add_parsers(sub: Any) -> None:
    """Register ``client`` with its sub-verbs ``train`` and ``personalize``."""
    client = sub.add_parser(
        "client",
        help="one company's side of a cross-silo federation (client train, client personalize)",
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
            "header, else data.labels of the config), keep a data.val_fraction validation slice (seeded by "
            "the config seed and --client-id; its scores go in the update's header) and train on every other "
            "row, from --global (or, before round 1, from the fresh adapter seeded by the config seed, "
            "identical on every client). Only the tensors of the round's roles are sent (all of LoRA and the "
            "head for fedavg; B and the head for ffa; A or B in turn for rolora), encoded as "
            "federation.transport; num_examples = training rows."
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

    pers = add_verb(
        verbs,
        "personalize",
        help="this client's own adapter: the federation's global adapter tuned on its own file",
        description=(
            "Personalize the global adapter on this client's file, as personalize.* says: 'finetune' (a short "
            "local fine-tune of LoRA and head), 'local_head' (FedRep-style: the global LoRA kept, only the "
            "head retrained) or 'prior' (nothing trained: the head's bias shifted by tau x log of this client's "
            "label frequencies, for a client that holds only some of the labels). The global adapter is kept "
            "unless the client's validation slice shows the change helps (finetune, local_head: by "
            "personalize.min_gain at personalize.confidence) or does no harm (prior: personalize.prior_margin). "
            "Writes a 'personalized' "
            "payload that 'lorafed export' accepts. It never leaves the client."
        ),
        example=(
            "lorafed client personalize --config fed.yaml --data mine.csv --client-id shopA "
            "--global global_r5.safetensors --out shopA_personal.safetensors personalize.method=local_head"
        ),
    )
    pers.add_argument("--config", required=True, help="the federation's YAML config")
    pers.add_argument("--data", required=True, help="this client's labelled CSV, JSONL or Parquet file")
    pers.add_argument("--client-id", required=True, help="this client's id (letters, digits, _ . -)")
    pers.add_argument("--global", dest="global_path", required=True, help="the federation's global adapter")
    pers.add_argument("--out", required=True, help="where to write the personalized adapter (.safetensors)")
    pers.add_argument("--no-progress", action="store_true", help="hide the progress bar (shown on a terminal only)")
    add_overrides(pers)
    pers.set_defaults(func=cmd_client_personalize)


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


def cmd_client_personalize(args: argparse.Namespace) -> int:
    """``lorafed client personalize``."""
    from lorafed.client.personalize import personalize_local
    from lorafed.config import load_config

    config = load_config(args.config, [*args.overrides, f"data.path={json.dumps(args.data)}"])
    if config.personalize.method == "none":
        raise LorafedError("personalize.method is none; pass personalize.method=finetune, local_head or prior")
    result = personalize_local(config, args.client_id, args.global_path, args.out, progress=not args.no_progress)
    rows = "validation" if result.selection == "validation" else "out-of-fold (cross-fit)"
    val = (
        f"{rows} macro-F1 {result.val_global:.4f} (global) -> {result.val_best:.4f}"
        if result.val_global is not None and result.val_best is not None
        else "no rows to judge on"
    )
    print(
        f"{args.client_id}: {result.method}, kept the checkpoint after {result.best_step} of {result.steps} "
        f"step(s); {val}; written to {args.out}"
    )
    return 0

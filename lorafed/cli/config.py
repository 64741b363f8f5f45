"""Config verbs: ``lorafed config show`` prints the resolved config (file + overrides + defaults) as YAML."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from lorafed.cli.common import add_overrides, add_verb
from lorafed.config import config_to_dict, load_config


def add_parsers(sub: Any) -> None:
    """Register ``config`` with its sub-verb ``show``."""
    cfg = sub.add_parser(
        "config",
        help="show the resolved config (file, overrides and every default)",
        description="Verbs about the run config.",
        epilog="example:\n  lorafed config show --config configs/tiny.yaml federation.rounds=5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = cfg.add_subparsers(dest="subverb", required=True, metavar="CONFIG_VERB")
    show = add_verb(
        verbs,
        "show",
        help="print the resolved config as YAML",
        description=(
            "Read --config, apply the KEY=VALUE overrides, fill in every default, validate it (all "
            "problems are listed together, exit code 2) and print the result as YAML: exactly what a "
            "run with the same arguments would use, and what it saves as config.yaml. Every key is "
            "described in the README's 'Config reference'."
        ),
        example=(
            "lorafed config show --config configs/tiny.yaml federation.min_clients=1 train.max_steps=10\n"
            "lorafed config show --config configs/tiny.yaml > full.yaml   # every key, ready to edit"
        ),
    )
    show.add_argument("--config", required=True, help="YAML run config")
    add_overrides(show)
    show.set_defaults(func=cmd_show)


def cmd_show(args: argparse.Namespace) -> int:
    """``lorafed config show``."""
    config = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
    return 0

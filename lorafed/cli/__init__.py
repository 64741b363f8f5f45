"""The ``lorafed`` command line: one module per step of the data flow.

========================  ======================================================================
module                    verbs
========================  ======================================================================
:mod:`lorafed.cli.run`    ``simulate``, ``compare``, ``personalize``, ``partition``, ``inspect``
:mod:`lorafed.cli.client` ``client train``, ``client personalize`` (a company's side)
:mod:`lorafed.cli.server` ``aggregate``, ``coordinate``, ``poll``
:mod:`lorafed.cli.flower` ``flower run``, ``flower app``
:mod:`lorafed.cli.serve`  ``serve``, ``combine``, ``export``, ``predict``, ``evaluate``
:mod:`lorafed.cli.data`   ``download``
:mod:`lorafed.cli.config` ``config show``
:mod:`lorafed.cli.keys`   ``keys new``, ``keys registry``
========================  ======================================================================

Each verb parses its arguments, calls the library and prints its result on standard output;
the library's log lines go to standard error (``--quiet``: warnings only, ``--verbose``: debug).
Input errors (:class:`~lorafed.errors.LorafedError`) print one line and give exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

from lorafed import __version__
from lorafed.cli import client, config, data, flower, keys, run, serve, server
from lorafed.cli.common import (
    EXIT_INPUT_ERROR,
    EXIT_INTERRUPTED,
    global_flags,
    is_override,
    removed_flag_message,
    setup_logging,
)
from lorafed.errors import LorafedError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every verb."""
    parser = argparse.ArgumentParser(
        prog="lorafed",
        description=textwrap.fill(
            "Federated LoRA fine-tuning of BERT-family classifiers. Each client keeps a frozen "
            "(8-bit by default) backbone and trains only LoRA adapters and the classifier head; "
            "only those tensors travel, as safetensors, and the server averages them with "
            "sample-weighted FedAvg. Every setting lives in the YAML config; any key can be "
            "overridden on any verb with KEY=VALUE (see 'lorafed config show').",
            width=100,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Run 'lorafed VERB --help' for the options of each verb.\n\n"
            "example:\n  lorafed simulate --config configs/tiny.yaml federation.rounds=2"
        ),
        parents=[global_flags()],
    )
    parser.add_argument("--version", action="version", version=f"lorafed {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    run.add_parsers(sub)  # simulate, compare, personalize, partition, inspect
    client.add_parsers(sub)  # client train, client personalize
    server.add_parsers(sub)  # aggregate, coordinate, poll
    flower.add_parsers(sub)  # flower run, flower app
    serve.add_parsers(sub)  # serve, combine, export, predict, evaluate
    data.add_parsers(sub)  # download
    config.add_parsers(sub)  # config show
    keys.add_parsers(sub)  # keys new, keys registry
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run a verb and return the exit code (2 for input errors, 130 after Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    hint = removed_flag_message(argv)
    if hint:
        verb = next((a for a in argv if not a.startswith("-")), "")
        print(f"lorafed {verb}: error: {hint}".replace("lorafed : ", "lorafed: "), file=sys.stderr)
        return EXIT_INPUT_ERROR
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may follow options (argparse stops filling a positional list at them).
    if extra:
        if hasattr(args, "overrides") and all(is_override(e) for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(quiet=getattr(args, "quiet", False), verbose=getattr(args, "verbose", False))
    name = " ".join(v for v in (args.verb, getattr(args, "subverb", None)) if v)
    try:
        return int(args.func(args))
    except LorafedError as exc:
        print(f"lorafed {name}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED

"""What every verb of the command line shares: overrides, the output folder, logging, exit codes.

* Config overrides are positional ``KEY=VALUE`` pairs on every verb that reads a config.
* A verb that writes a folder takes ``--out`` (with a default where one makes sense) and
  ``--overwrite``; :func:`output_folder` is the one place that decides what happens to an
  existing folder.
* :func:`add_verb` builds each verb's parser, so every verb has a description, an ``example:``
  epilog and the ``--quiet``/``--verbose`` flags.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorafed.errors import LorafedError
from lorafed.logs import configure

#: Exit code of an input error (bad config, data, payload, arguments).
EXIT_INPUT_ERROR = 2
#: Exit code after Ctrl-C.
EXIT_INTERRUPTED = 130

OVERRIDES_HELP = (
    "config overrides as dotted KEY=VALUE pairs, values parsed as YAML, e.g. federation.rounds=5 "
    "train.max_steps=20 model.precision=fp32 data.max_rows=2000 (every key: README, 'Config reference')"
)

#: Flags that became config keys: flag -> the override to use instead.
REMOVED_FLAGS = {
    "--set": "KEY=VALUE (positional, no --set)",
    "--rounds": "federation.rounds=N",
    "--min-clients": "federation.min_clients=N",
    "--weighting": "federation.weighting=samples|uniform",
    "--deadline-s": "federation.client_timeout_s=SECONDS",
    "--round-timeout": "federation.client_timeout_s=SECONDS",
}

_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")


def is_override(arg: str) -> bool:
    """Whether a command-line word is a ``KEY=VALUE`` config override (``a.b=1``, not ``./x=1.csv``)."""
    return bool(_OVERRIDE.match(arg))


def split_overrides(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split a positional list into (plain arguments, ``KEY=VALUE`` overrides)."""
    plain = [a for a in items if not is_override(a)]
    return plain, [a for a in items if is_override(a)]


def global_flags() -> argparse.ArgumentParser:
    """``--quiet`` / ``--verbose``, accepted before the verb and after it (the later one wins)."""
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_mutually_exclusive_group()
    group.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="show warnings and errors only"
    )
    group.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
        help="show debug messages, with time, level and logger name",
    )  # fmt: skip
    return flags


def add_verb(
    sub: Any,
    name: str,
    *,
    help: str,
    description: str,
    example: str,
    notes: str = "",
) -> argparse.ArgumentParser:
    """Register one verb: its summary, a wrapped description and an epilog that ends with an example.

    Args:
        sub: The sub-parsers object to add to.
        name: The verb.
        help: One line for the verb list.
        description: What it does; paragraphs separated by blank lines are wrapped.
        example: One or more command lines (one per line), printed under ``example:``.
        notes: Preformatted text printed before the example (math, data sets).

    Returns:
        The verb's parser.
    """
    paragraphs = [textwrap.fill(" ".join(p.split()), width=100) for p in description.strip().split("\n\n")]
    lines = example.strip().splitlines()
    epilog = (notes.rstrip() + "\n\n" if notes else "") + "example:\n" + "\n".join(f"  {x}" for x in lines)
    return sub.add_parser(
        name,
        help=help,
        description="\n\n".join(paragraphs),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[global_flags()],
    )


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """The positional ``KEY=VALUE`` overrides."""
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)


def add_output(parser: argparse.ArgumentParser, default: str | None, what: str = "output folder") -> None:
    """``--out`` (required when ``default`` is ``None``) and ``--overwrite``.

    Args:
        parser: The verb's parser.
        default: Words describing the default folder, or ``None`` to make ``--out`` required.
        what: What the folder holds.
    """
    if default is None:
        parser.add_argument("--out", required=True, help=what)
    else:
        parser.add_argument("--out", help=f"{what} (default: {default})")
    parser.add_argument("--overwrite", action="store_true", help="replace the folder if it exists and is not empty")


def output_folder(out: str | Path | None, default: str | Path | None, overwrite: bool) -> Path:
    """The folder a verb writes, made ready: refused if it holds files, unless ``overwrite`` (then emptied).

    Args:
        out: ``--out``, or ``None``.
        default: The folder used without ``--out``.
        overwrite: ``--overwrite``: remove an existing folder first.

    Returns:
        The folder (absolute; it may not exist yet).

    Raises:
        LorafedError: The folder exists with files in it and ``overwrite`` is false, or it is a file.
    """
    chosen = out if out is not None else default
    if chosen is None:  # pragma: no cover - add_output makes --out required then
        raise LorafedError("--out: required")
    path = Path(chosen).resolve()
    if path.exists() and not path.is_dir():
        raise LorafedError(f"--out {path}: is a file, not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise LorafedError(f"output folder {path} already exists; pass --overwrite or --out ELSEWHERE")
        shutil.rmtree(path)
    return path


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Show lorafed's log lines on standard error: INFO and up (``quiet``: WARNING, ``verbose``: DEBUG)."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    configure(level, detailed=verbose)


def removed_flag_message(args: Sequence[str]) -> str | None:
    """A hint for the first removed flag in ``args`` (``--min-clients 3`` -> ``federation.min_clients=N``)."""
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in REMOVED_FLAGS:
            return f"{flag} was removed; pass {REMOVED_FLAGS[flag]} after the verb instead"
    return None


def optional_config(path: str | None, overrides: Sequence[str]) -> Any:
    """The config at ``path`` with ``overrides``, or ``None`` without ``--config``.

    Raises:
        LorafedError: Overrides given without a config to apply them to.
    """
    from lorafed.config import load_config

    if path is None:
        if overrides:
            raise LorafedError(f"config overrides {list(overrides)} need --config (the federation's YAML)")
        return None
    return load_config(path, overrides)

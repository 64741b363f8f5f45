"""Download the public data sets of configs/ (all by default) to ../shared/data, sha256-verified.

usage: python scripts/download_data.py [NAME ...] [--dir DIR] [--url URL]

A thin wrapper over ``lorafed download``; run ``lorafed download --help`` for sources and licences.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorafed.cli import main
from lorafed.data.download import DATASETS

DEFAULT_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def run(argv: list[str] | None = None) -> int:
    """Run ``lorafed download`` for each name; return the first non-zero exit code, else 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"default: all ({', '.join(DATASETS)})")
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help=f"destination root (default: {DEFAULT_DIR})")
    parser.add_argument("--url", help="mirror URL (only with a single NAME)")
    args = parser.parse_args(argv)
    names = args.names or list(DATASETS)
    if args.url and len(names) != 1:
        parser.error("--url needs exactly one NAME")
    for name in names:
        code = main(["download", name, "--dir", args.dir, *(["--url", args.url] if args.url else [])])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(run())

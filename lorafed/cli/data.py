"""Data verbs: ``lorafed download`` fetches a public data set of the configs and verifies its sha256."""

from __future__ import annotations

import argparse
from typing import Any

from lorafed.cli.common import add_verb
from lorafed.data.download import DATASETS, DEFAULT_TIMEOUT_S, download


def _datasets_epilog() -> str:
    lines = ["data sets:"]
    for source in DATASETS.values():
        lines += [
            f"  {source.name}",
            f"      {source.description}",
            f"      file:    {source.name}/{source.filename}  (sha256 {source.sha256[:16]}...)",
            f"      source:  {source.url}",
            f"      licence: {source.licence}",
            f"      cite:    {source.citation}",
        ]
    return "\n".join(lines)


def add_parsers(sub: Any) -> None:
    """Register ``download``."""
    p = add_verb(
        sub,
        "download",
        help="download a public data set used by configs/ and verify its sha256",
        description=(
            "Download NAME from its source pinned to one commit into DIR/NAME/, extract or clean it "
            "as its entry says, and check the sha256 of the result; a file that fails the check is "
            "removed. A file already in place with the right sha256 is kept. The configs read "
            "../shared/data, so '--dir ../shared/data' (from the project root) puts files where they look."
        ),
        notes=_datasets_epilog(),
        example=(
            "lorafed download bitext-retail-intents --dir ../shared/data\n"
            "lorafed download womens-clothing-reviews --dir ../shared/data --url file:///mnt/mirror/reviews.csv"
        ),
    )
    p.add_argument("name", metavar="NAME", help=f"data set: {', '.join(DATASETS)}")
    p.add_argument("--dir", required=True, help="destination root; the file goes to DIR/NAME/")
    p.add_argument("--url", help="download from this mirror (http(s):// or file://) instead; same sha256 check")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds without data before giving up")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar (shown on a terminal only)")
    p.set_defaults(func=_cmd_download)


def _cmd_download(args: argparse.Namespace) -> int:
    path = download(args.name, args.dir, args.url, progress=not args.no_progress, timeout=args.timeout)
    print(f"{args.name}: {path} (sha256 verified)")
    return 0

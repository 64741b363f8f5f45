"""Data verbs: ``lorafed download`` fetches a public data set of the configs and verifies its sha256;
``lorafed whiten`` fits the feature whitening a ``model.whitening`` config reads."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lorafed.cli.common import add_overrides, add_verb
from lorafed.config import load_config
from lorafed.data.download import DATASETS, DEFAULT_TIMEOUT_S, download
from lorafed.errors import LorafedError


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
    """Register ``download`` and ``whiten``."""
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
    _add_whiten(sub)


def _add_whiten(sub: Any) -> None:
    from lorafed.model.whitening import DEFAULT_SHRINKAGE

    w = add_verb(
        sub,
        "whiten",
        help="fit the whitening of the mean-pooled feature (model.whitening) on public or server-held text",
        description=(
            "Run the config's frozen backbone (model.pooling mean, model.num_layers, data.max_length) on the texts "
            "of FILE (CSV, JSONL or Parquet; the config's data.text_column and text_pair_column; no labels "
            "needed; rows without text are left out), and write OUT: the features' mean and the transform "
            "T = s (C + lambda I)^(-1/2), lambda = SHRINKAGE x the covariance's largest eigenvalue, s so the "
            "whitened rows have mean norm 1. Set model.whitening=OUT in the config every client runs: the "
            "transform goes into BERT's pooler, so the head trains on decorrelated features, which helps plain "
            "training and even more DP-SGD (see lorafed config show, model.whitening)."
            "\n\nThe rows are read by whoever runs this, outside any client's DP accounting: use public text "
            "(a catalogue, public reviews) or text the server holds (its validation rows), not a client's "
            "training rows. A few thousand rows are enough for a 384-wide feature (fewer than twice the width "
            "warns)."
        ),
        example=(
            "lorafed whiten --config configs/clothing_recommend.yaml --data public_reviews.csv "
            "--out whitening.safetensors model.pooling=mean model.num_layers=4 data.max_length=128\n"
            "lorafed simulate --config configs/clothing_recommend.yaml model.pooling=mean model.num_layers=4 "
            "data.max_length=128 model.whitening=whitening.safetensors"
        ),
    )
    w.add_argument("--config", required=True, help="the federation's YAML config (its model and data sections)")
    add_overrides(w)
    w.add_argument("--data", required=True, metavar="FILE", help="unlabelled text rows: CSV, JSONL or Parquet")
    w.add_argument("--out", required=True, help="the whitening file to write (safetensors)")
    w.add_argument(
        "--shrinkage", type=float, default=DEFAULT_SHRINKAGE, help="lambda over the largest eigenvalue (default 0.01)"
    )
    w.add_argument("--max-rows", type=int, default=None, help="use the first N rows with text only")
    w.add_argument("--no-progress", action="store_true", help="hide the progress bar (shown on a terminal only)")
    w.set_defaults(func=_cmd_whiten)


def _cmd_whiten(args: argparse.Namespace) -> int:
    from lorafed.data.clean import unlabeled_texts
    from lorafed.data.read import read_table
    from lorafed.model.whitening import fit_from_texts

    config = load_config(args.config, args.overrides)
    if config.model.pooling != "mean":
        raise LorafedError(f"needs model.pooling=mean (the config has {config.model.pooling}); add model.pooling=mean")
    if args.max_rows is not None and args.max_rows < 2:
        raise LorafedError(f"--max-rows {args.max_rows}: needs at least 2 rows")
    d = config.data
    texts, pairs, skipped = unlabeled_texts(read_table(args.data), args.data, d.text_column, d.text_pair_column)
    if args.max_rows is not None:
        texts = texts[: args.max_rows]
        pairs = None if pairs is None else pairs[: args.max_rows]
    w = fit_from_texts(
        config.model,
        texts,
        pairs,
        d.pair_mode,
        d.max_length,
        args.out,
        args.shrinkage,
        progress=not args.no_progress,
        source=Path(args.data).name,
    )
    note = f" ({skipped} rows without text left out)" if skipped else ""
    print(f"{args.out}: whitening of {len(texts)} rows{note}, {w.digest}")
    print(f"set model.whitening={args.out} in the config every client of the federation runs")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    path = download(args.name, args.dir, args.url, progress=not args.no_progress, timeout=args.timeout)
    print(f"{args.name}: {path} (sha256 verified)")
    return 0

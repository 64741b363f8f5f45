"""Registers the cross-silo and serving verbs (client train, aggregate, merge, export, predict, evaluate)."""

from __future__ import annotations

from typing import Any

from lorafed import cli_client, cli_serve


def add_silo_verbs(sub: Any) -> None:
    """Add the verbs of :mod:`lorafed.cli_client` and :mod:`lorafed.cli_serve` to the ``lorafed`` parser."""
    cli_client.add_parser(sub)
    cli_serve.add_parser(sub)

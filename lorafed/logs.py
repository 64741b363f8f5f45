"""Where lorafed's log lines go: one handler on the ``lorafed`` logger, writing to standard error.

The library only logs (``logging.getLogger(__name__)``); whoever runs it decides where the lines
go. The command line calls :func:`configure` once; a Flower app, which has no ``main`` of ours,
calls :func:`ensure_handler` so ``flwr log`` shows each round.
"""

from __future__ import annotations

import logging
import sys
import typing

#: The logger every lorafed module logs under.
ROOT = "lorafed"

_PLAIN = "%(message)s"
_DETAILED = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (tests and Flower swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> typing.TextIO:
        """The current standard error."""
        return sys.stderr

    @stream.setter
    def stream(self, _value: typing.TextIO) -> None:
        """Ignored: the stream is always the current standard error."""


def configure(level: int = logging.INFO, detailed: bool = False) -> logging.Handler:
    """Send lorafed's log records at ``level`` and above to standard error, replacing an earlier call's handler.

    Args:
        level: The lowest level shown (``logging.WARNING`` for ``--quiet``, ``DEBUG`` for ``--verbose``).
        detailed: Prefix each line with the time, level and logger name.

    Returns:
        The handler now attached to the ``lorafed`` logger.
    """
    logger = logging.getLogger(ROOT)
    for old in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(_DETAILED if detailed else _PLAIN))
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


def ensure_handler(level: int = logging.INFO) -> None:
    """Attach the plain standard-error handler to the ``lorafed`` logger unless it already has a handler."""
    logger = logging.getLogger(ROOT)
    if not logger.handlers:
        configure(level)

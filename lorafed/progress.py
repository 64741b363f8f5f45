"""Progress bars that show on a terminal and stay out of logs.

A bar draws only when it is enabled and standard error is a terminal: redirected output (a log
file, CI, ``flwr log``) gets no carriage returns or cursor escapes. ``LORAFED_PROGRESS=1``
forces bars on, ``0`` forces them off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def bars_enabled(enabled: bool = True) -> bool:
    """Whether a bar asked for with ``enabled`` should draw here."""
    forced = os.environ.get("LORAFED_PROGRESS")
    if forced in ("0", "1"):
        return enabled and forced == "1"
    return enabled and sys.stderr.isatty()


def progress_bar(iterable: Iterable[T] | None = None, enabled: bool = True, **kwargs: Any) -> Any:
    """A ``tqdm`` bar over ``iterable`` (or a manual one), drawn only where :func:`bars_enabled`."""
    return tqdm(iterable, disable=not bars_enabled(enabled), **kwargs)

"""Crash-safe file writing: every file lorafed writes goes to a temporary name, then is renamed.

A reader therefore sees either the old file or the whole new one, never a torn write, even
if the process is killed mid-write.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lorafed.errors import LorafedError

#: Why a write failed, for the errors a user can fix (anything else is raised as it is).
_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def current_umask() -> int:
    """The process umask: from ``/proc/self/status`` on Linux (no race with other threads),
    else by setting it and restoring it at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    The file gets the mode a plain ``open(path, "w")`` would give it, ``0o666 & ~umask``
    (0644 under umask 022), and new folders ``0o777 & ~umask``, not the 0600 of a temporary file.

    Args:
        path: Destination; its parent folders are created.
        data: The bytes to write.

    Returns:
        The destination path.

    Raises:
        LorafedError: The disk is full, read-only or not writable by this user, naming the path
            and the reason; the destination is untouched and no temporary file is left behind.
    """
    dest = Path(path)
    tmp: str | None = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)  # mkdir applies the umask itself
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), 0o666 & ~current_umask())
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        reason = _WRITE_ERRORS.get(exc.errno or 0)
        if reason is None:
            raise
        raise LorafedError(f"{dest}: cannot write: {reason} ({exc.strerror}); nothing was changed") from exc
    return dest


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON line per record, atomically (the whole file is replaced)."""
    return atomic_write_text(path, "".join(json.dumps(r, sort_keys=False) + "\n" for r in records))


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line by rewriting the file atomically, so a kill never leaves a torn line.

    The file is re-read on each call: fine for logs of rounds (hundreds of short lines).
    """
    dest = Path(path)
    old = dest.read_bytes() if dest.is_file() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    atomic_write_bytes(dest, old + (json.dumps(record, sort_keys=False) + "\n").encode("utf-8"))

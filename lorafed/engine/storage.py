"""Where the file-drop coordinator and its clients exchange payloads: a folder or an fsspec URL.

:class:`Storage` is four operations on names relative to a root (``list``, ``read``, ``write``,
``exists``); ``write`` must be atomic, so a reader never sees half a payload. A local folder
writes a temporary file and renames it; an fsspec store (``s3://``, ``gs://``, ``memory://``...)
writes a temporary object and moves it, and object stores make a single PUT visible atomically.
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from pathlib import Path
from typing import Protocol

from lorafed.errors import StorageError
from lorafed.files import atomic_write_bytes


class Storage(Protocol):
    """The operations the coordinator and clients need."""

    def list(self, prefix: str) -> list[str]:
        """Names under ``prefix`` (a folder such as ``round_3``), sorted, temporary files excluded."""
        ...

    def read(self, name: str) -> bytes:
        """The bytes of ``name``."""
        ...

    def write(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically."""
        ...

    def exists(self, name: str) -> bool:
        """Whether ``name`` exists."""
        ...


def check_name(name: str) -> str:
    """``name`` if it is a plain relative name inside the drop.

    Raises:
        StorageError: An empty, absolute or ``..`` component, a backslash or a control character.
    """
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or not name.isprintable()
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise StorageError("refused: not a plain relative name inside the drop", name=name[:200])
    return name


class LocalStorage:
    """A folder on a local or shared (NFS, SMB) file system.

    Symbolic links are never followed below the root: :meth:`list` names them (so a round records
    them) but :meth:`read`, :meth:`write` and :meth:`exists` refuse them with a
    :class:`~lorafed.errors.StorageError`. A name is never written over a file that the file
    system reached under another name (case-insensitive or normalizing file systems map
    ``Alice`` and ``alice`` to one file).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, name: str) -> Path:
        """The local path of ``name``, refusing any symbolic link on the way from the root."""
        path = self.root
        for part in check_name(name).split("/"):
            path = path / part
            if path.is_symlink():
                raise StorageError(f"refused: {path} is a symbolic link (links are never followed)", name=name)
        return path

    def list(self, prefix: str) -> list[str]:
        folder = self._path(prefix)
        if not folder.is_dir():
            return []
        return sorted(
            f"{prefix}/{p.name}"
            for p in folder.iterdir()
            if not p.name.startswith(".") and (p.is_symlink() or p.is_file())
        )

    def read(self, name: str) -> bytes:
        path = self._path(name)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StorageError("refused: a symbolic link (links are never followed)", name=name) from exc
            raise StorageError(f"cannot read: {exc.strerror}", name=name) from exc
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise StorageError("refused: not a regular file", name=name)
            return fh.read()

    def write(self, name: str, data: bytes) -> None:
        path = self._path(name)
        if path.exists() and path.name not in os.listdir(path.parent):
            raise StorageError(
                "refused: the file system maps this name to a file written under another name "
                "(case-insensitive or normalizing file system); nothing was overwritten",
                name=name,
            )
        atomic_write_bytes(path, data)

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()


class FsspecStorage:
    """Any fsspec file system, e.g. ``s3://bucket/federation`` (credentials from the usual places)."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/")

    def _path(self, name: str) -> str:
        return f"{self.root}/{check_name(name)}"

    def list(self, prefix: str) -> list[str]:
        folder = self._path(prefix)
        if not self.fs.isdir(folder):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)]
        return sorted(f"{prefix}/{n}" for n in names if not n.startswith("."))

    def read(self, name: str) -> bytes:
        return bytes(self.fs.cat_file(self._path(name)))

    def write(self, name: str, data: bytes) -> None:
        parent, _, base = self._path(name).rpartition("/")
        tmp = f"{parent}/.{base}.{uuid.uuid4().hex}.tmp"
        self.fs.makedirs(parent, exist_ok=True)
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, self._path(name))

    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(self._path(name)))


def open_storage(location: str | Path) -> Storage:
    """A local folder for a path (or ``file://``), fsspec for any other URL scheme."""
    text = str(location)
    if "://" in text and not text.startswith("file://"):
        return FsspecStorage(text)
    return LocalStorage(text.removeprefix("file://"))

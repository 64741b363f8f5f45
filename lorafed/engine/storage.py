"""Where the file-drop coordinator and its clients exchange payloads: a folder or an fsspec URL.

:class:`Storage` is four operations on names relative to a root (``list``, ``read``, ``write``,
``exists``); ``write`` must be atomic, so a reader never sees half a payload. A local folder
writes a temporary file and renames it; an fsspec store (``s3://``, ``gs://``, ``memory://``...)
writes a temporary object and moves it, and object stores make a single PUT visible atomically.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Protocol

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


class LocalStorage:
    """A folder on a local or shared (NFS, SMB) file system."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def list(self, prefix: str) -> list[str]:
        folder = self.root / prefix
        if not folder.is_dir():
            return []
        return sorted(f"{prefix}/{p.name}" for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.root / name, data)

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()


class FsspecStorage:
    """Any fsspec file system, e.g. ``s3://bucket/federation`` (credentials from the usual places)."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/")

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

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

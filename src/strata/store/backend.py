"""The dumb object store under a Strata store: save, load, stat, list, remove.

Everything above (packs, snapshots, keys) speaks only this contract, so a local
directory and an object store are interchangeable. Writes are atomic: an object either
exists whole or not at all, even if the process is killed mid-write.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from strata.errors import StrataError


class StoreFull(StrataError):
    """The disk under the store is full; nothing partial was left behind."""


class Backend(Protocol):
    def save(self, kind: str, name: str, data: bytes) -> None: ...
    def save_file(self, kind: str, name: str, path: Path) -> None: ...
    def load(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes: ...
    def size(self, kind: str, name: str) -> int: ...
    def exists(self, kind: str, name: str) -> bool: ...
    def list(self, kind: str) -> Iterator[str]: ...
    def remove(self, kind: str, name: str) -> None: ...


# Kinds whose objects are spread over 256 sub-folders so no folder grows huge.
_FANNED_OUT = {"packs"}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` via a temp file and rename, so readers never see a torn file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFull(f"no space left to write {path.name}: {exc.strerror}") from None
        raise


class LocalBackend:
    """A store kept in a local directory: DIR/<kind>/<name> (packs fanned out by prefix)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, kind: str, name: str) -> Path:
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad object name {name!r}")
        if kind in _FANNED_OUT:
            return self.root / kind / name[:2] / name
        return self.root / kind / name

    def save(self, kind: str, name: str, data: bytes) -> None:
        path = self._path(kind, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)

    def save_file(self, kind: str, name: str, path: Path) -> None:
        """Move a finished, fsynced file (on the same filesystem) into place atomically."""
        dest = self._path(kind, name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, dest)
        fsync_dir(dest.parent)

    def load(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes:
        with open(self._path(kind, name), "rb") as f:
            if offset:
                f.seek(offset)
            return f.read() if length is None else f.read(length)

    def size(self, kind: str, name: str) -> int:
        return self._path(kind, name).stat().st_size

    def exists(self, kind: str, name: str) -> bool:
        return self._path(kind, name).exists()

    def list(self, kind: str) -> Iterator[str]:
        base = self.root / kind
        if not base.is_dir():
            return
        dirs = sorted(p for p in base.iterdir() if p.is_dir()) if kind in _FANNED_OUT else [base]
        for d in dirs:
            for p in sorted(d.iterdir()):
                if p.is_file() and not p.name.startswith("."):
                    yield p.name

    def remove(self, kind: str, name: str) -> None:
        self._path(kind, name).unlink(missing_ok=True)

    def path(self, kind: str, name: str) -> Path:
        """Local path of an object (for in-place reads such as mmap)."""
        return self._path(kind, name)

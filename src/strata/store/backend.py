"""The dumb object store under a Strata store: save, load (a byte range), stat, list, remove.

Everything above it (config, keys, snapshots, packs) speaks only this contract, so a local
directory and an object store are interchangeable; a backend knows nothing of chunks,
indexes or encryption. The contract, which every implementation keeps:

- Objects are named `(kind, name)`, `kind` one of `KINDS`. Objects are written once and
  never changed in place (names are content hashes or ids), so a reader may cache them.
- Writes are atomic: an object exists whole or not at all, even if the process is killed
  mid-write. `save` takes the bytes (an object store: one PUT); `save_file` takes a
  finished local file and consumes it (here: a rename; an object store: an upload, then
  the file is deleted). A full store raises `StoreFull`, any other failure `OSError`.
- `load` reads `length` bytes from `offset` (all the rest if `length` is None); it
  returns fewer only if the object ends first. A missing object raises `ObjectNotFound`.
- `stat` gives the size and the time the object was written (an object store: HEAD's
  Content-Length and Last-Modified); prune judges a pack's age by it.
"""

from __future__ import annotations

import errno
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from strata.errors import StrataError

# The store config (one object named "config"), wrapped master keys, snapshot records,
# and packs of chunks.
KINDS = frozenset({"config", "keys", "snapshots", "packs"})


class StoreFull(StrataError):
    """The disk under the store is full; nothing partial was left behind."""


class ObjectNotFound(StrataError, FileNotFoundError):
    """The object asked for is not in the store (an `OSError` too, so code that treats
    any failed read alike keeps doing so)."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    size: int
    mtime: float  # when the object was written, seconds since the epoch


class Backend(Protocol):
    def save(self, kind: str, name: str, data: bytes) -> None: ...
    def save_file(self, kind: str, name: str, path: Path) -> None: ...
    def load(self, kind: str, name: str, offset: int = 0,
             length: int | None = None) -> bytes: ...
    def stat(self, kind: str, name: str) -> ObjectInfo: ...
    def exists(self, kind: str, name: str) -> bool: ...
    def list(self, kind: str) -> Iterator[str]: ...
    def remove(self, kind: str, name: str) -> None: ...
    def close(self) -> None: ...


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


# Kinds whose objects are spread over 256 sub-folders so no folder grows huge.
_FANNED_OUT = frozenset({"packs"})
# Kinds whose objects lie in the store folder itself (DIR/config).
_AT_ROOT = frozenset({"config"})
# Kinds read many times in small ranges (a chunk at a time): their files stay open.
_KEPT_OPEN = frozenset({"packs"})


class _OpenFile:
    """A cached descriptor and how many reads are using it: one evicted from the cache
    while another thread reads through it is closed only once that read is done (closed
    at once, its number could be reused by the next open and the read would get another
    file's bytes)."""

    __slots__ = ("evicted", "fd", "users")

    def __init__(self, fd: int):
        self.fd = fd
        self.users = 0
        self.evicted = False


class LocalBackend:
    """A store kept in a local directory: DIR/config, DIR/<kind>/<name>, packs fanned out
    by the first two hex digits of their name.

    Chunk reads are `pread`s on descriptors kept open (the least recently used of
    `open_files` are closed): opening a pack per chunk would cost a path lookup and two
    system calls more per chunk read.
    """

    def __init__(self, root: Path, *, open_files: int = 64):
        self.root = Path(root)
        self._open: OrderedDict[tuple[str, str], _OpenFile] = OrderedDict()
        self._open_lock = threading.Lock()
        self._max_open = open_files

    def _path(self, kind: str, name: str) -> Path:
        if kind not in KINDS:
            raise ValueError(f"unknown object kind {kind!r}")
        if not name or "/" in name or "\0" in name or name.startswith("."):
            raise ValueError(f"bad object name {name!r}")
        if kind in _AT_ROOT:
            return self.root / name
        if kind in _FANNED_OUT:
            return self.root / kind / name[:2] / name
        return self.root / kind / name

    # -- writing ---------------------------------------------------------------
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

    def remove(self, kind: str, name: str) -> None:
        path = self._path(kind, name)
        self._forget_fd(kind, name)
        path.unlink(missing_ok=True)

    # -- reading ---------------------------------------------------------------
    def load(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if kind not in _KEPT_OPEN:
            try:
                with open(self._path(kind, name), "rb") as f:
                    f.seek(offset)
                    return f.read() if length is None else f.read(length)
            except FileNotFoundError:
                raise ObjectNotFound(f"{kind} object {name[:16]} is missing") from None
        entry = self._acquire(kind, name)
        try:
            if length is None:
                length = max(0, os.fstat(entry.fd).st_size - offset)
            return _pread_all(entry.fd, length, offset)
        finally:
            self._release(entry)

    def stat(self, kind: str, name: str) -> ObjectInfo:
        try:
            st = self._path(kind, name).stat()
        except FileNotFoundError:
            raise ObjectNotFound(f"{kind} object {name[:16]} is missing") from None
        return ObjectInfo(st.st_size, st.st_mtime)

    def exists(self, kind: str, name: str) -> bool:
        return self._path(kind, name).exists()

    def list(self, kind: str) -> Iterator[str]:
        if kind not in KINDS or kind in _AT_ROOT:
            raise ValueError(f"objects of kind {kind!r} cannot be listed")
        # scandir: the entry types come with the names, no stat per object (prune lists
        # the snapshots while it holds the commit lock).
        base = self.root / kind
        if kind in _FANNED_OUT:
            dirs = sorted(e.path for e in _scan(base) if e.is_dir(follow_symlinks=False))
        else:
            dirs = [str(base)]
        for d in dirs:
            yield from sorted(e.name for e in _scan(d)
                              if e.is_file(follow_symlinks=False) and not e.name.startswith("."))

    def close(self) -> None:
        with self._open_lock:
            entries = list(self._open.values())
            self._open.clear()
            for entry in entries:
                entry.evicted = True
                if entry.users == 0:
                    os.close(entry.fd)

    # -- the descriptor cache ------------------------------------------------------
    def _acquire(self, kind: str, name: str) -> _OpenFile:
        # The cache is looked up by name before any path is made: a chunk read is a
        # dict lookup and a pread (making the path took twice as long as the read).
        key = (kind, name)
        with self._open_lock:
            entry = self._open.get(key)
            if entry is not None:
                self._open.move_to_end(key)
                entry.users += 1
                return entry
        try:  # opened outside the lock: other readers do not wait on a slow disk
            fd = os.open(self._path(kind, name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ObjectNotFound(f"{kind} object {name[:16]} is missing") from None
        with self._open_lock:
            entry = self._open.get(key)
            if entry is not None:  # another thread opened it meanwhile
                os.close(fd)
                self._open.move_to_end(key)
            else:
                entry = self._open[key] = _OpenFile(fd)
                if len(self._open) > self._max_open:
                    self._evict(self._open.popitem(last=False)[1])
            entry.users += 1
            return entry

    def _release(self, entry: _OpenFile) -> None:
        with self._open_lock:
            entry.users -= 1
            if entry.evicted and entry.users == 0:
                os.close(entry.fd)

    def _evict(self, entry: _OpenFile) -> None:  # with _open_lock held
        entry.evicted = True
        if entry.users == 0:
            os.close(entry.fd)

    def _forget_fd(self, kind: str, name: str) -> None:
        with self._open_lock:
            entry = self._open.pop((kind, name), None)
            if entry is not None:
                self._evict(entry)


def _scan(folder: str | Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except FileNotFoundError:
        return []  # not made yet, or an emptied fan-out folder removed meanwhile


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]  # a short read before the end (a signal, a huge range): read on
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)

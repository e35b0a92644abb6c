"""Ranged reads of packs served from aligned blocks kept in memory: a `Backend` wrapper for
object stores, where every request costs milliseconds.

Chunks are read back in about the order they were written (a restore walks its manifest,
whose files went into packs in that order), so one GET of a 1 MiB block serves the next
dozen chunk reads too: restoring 300 MiB of /usr from moto went from 2.4 MiB/s with a GET
per chunk to 45 MiB/s (51 from a local store, same run). A local
directory does not need it (a `pread` costs microseconds). Whole-object reads (check
--read-data) pass straight through, so damage is never hidden by a cached copy.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

from strata.store.backend import Backend, ObjectInfo

BLOCK_SIZE = 1 << 20
BLOCKS = 48  # 48 MiB: two or three packs ahead of every reader of a busy server


class _Fetch:
    """A block being read by one thread, that others wanting it wait for (readers ask for
    neighbouring chunks at once: without this each would fetch the same block)."""

    __slots__ = ("data", "done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.data = b""
        self.error: BaseException | None = None


class BlockCache:
    def __init__(self, inner: Backend, *, block_size: int = BLOCK_SIZE, blocks: int = BLOCKS,
                 kinds: frozenset[str] = frozenset({"packs"})):
        self.inner = inner
        self.block_size = block_size
        self.kinds = kinds
        self._max = blocks
        self._blocks: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()
        self._fetching: dict[tuple[str, str, int], _Fetch] = {}
        self._lock = threading.Lock()

    # -- reading -----------------------------------------------------------------------
    def load(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if kind not in self.kinds or length is None:
            return self.inner.load(kind, name, offset, length)
        if length <= 0:
            return b""
        size = self.block_size
        first, last = offset // size, (offset + length - 1) // size
        parts = []
        for i in range(first, last + 1):
            block = self._block(kind, name, i)
            parts.append(block)
            if len(block) < size:
                break  # the object ends in this block
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        start = offset - first * size
        return data[start:start + length]

    def _block(self, kind: str, name: str, index: int) -> bytes:
        key = (kind, name, index)
        with self._lock:
            block = self._blocks.get(key)
            if block is not None:
                self._blocks.move_to_end(key)
                return block
            fetch = self._fetching.get(key)
            mine = fetch is None
            if fetch is None:
                fetch = self._fetching[key] = _Fetch()
        if not mine:
            fetch.done.wait()
            if fetch.error is not None:
                raise fetch.error
            return fetch.data
        try:
            fetch.data = self.inner.load(kind, name, index * self.block_size, self.block_size)
        except BaseException as exc:
            fetch.error = exc
            raise
        finally:
            with self._lock:
                del self._fetching[key]
                if fetch.error is None:
                    self._blocks[key] = fetch.data
                    while len(self._blocks) > self._max:
                        self._blocks.popitem(last=False)
            fetch.done.set()
        return fetch.data

    def stat(self, kind: str, name: str) -> ObjectInfo:
        return self.inner.stat(kind, name)

    def exists(self, kind: str, name: str) -> bool:
        return self.inner.exists(kind, name)

    def list(self, kind: str) -> Iterator[str]:
        return self.inner.list(kind)

    # -- writing: never serve an old copy of a name written or removed here -----------------
    def save(self, kind: str, name: str, data: bytes) -> None:
        self._forget(kind, [name])
        self.inner.save(kind, name, data)

    def save_file(self, kind: str, name: str, path: Path) -> None:
        self._forget(kind, [name])
        self.inner.save_file(kind, name, path)

    def remove(self, kind: str, name: str) -> None:
        self._forget(kind, [name])
        self.inner.remove(kind, name)

    def remove_many(self, kind: str, names: Iterable[str]) -> None:
        names = [*names]
        self._forget(kind, names)
        self.inner.remove_many(kind, names)

    def _forget(self, kind: str, names: Iterable[str]) -> None:
        if kind not in self.kinds:
            return
        gone = set(names)
        with self._lock:
            for key in [k for k in self._blocks if k[0] == kind and k[1] in gone]:
                del self._blocks[key]

    def close(self) -> None:
        with self._lock:
            self._blocks.clear()
        self.inner.close()

"""The reflector's chunk cache: a Store (the engine the server and the agent use), bounded
in size. Every chunk is checked against its id before it is kept and again as it is read
(the store's decoder does), and whole packs go, least recently used first, when the
cache outgrows its limit."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path

from strata.errors import CorruptData, StrataError
from strata.model.ids import content_id
from strata.store.repository import Store

PACK_SIZE = 4 << 20  # eviction frees a pack at a time: small packs keep it fine-grained
MIN_CACHE = 16 << 20


class ChunkCache:
    def __init__(self, path: Path, limit: int):
        self.path = path
        self.limit = max(limit, MIN_CACHE)
        if not (path / "config").exists():
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            if any(path.iterdir()):
                raise StrataError(f"cache folder {path} is not empty and holds no cache")
            Store.init(path, compression="zstd:3", pack_size=PACK_SIZE).close()
        self.store = Store.open(path)
        self.store.reconcile_index()
        self._lock = threading.Lock()
        # pack -> last use (monotonic); packs another process added (an import) count as
        # used when first seen.
        self._used: dict[str, float] = {}
        self.evicted_bytes = 0

    def close(self) -> None:
        self.store.close()

    def get(self, cid: bytes) -> bytes | None:
        """The chunk if the cache holds it whole; None for a miss (or damage: the chunk
        is fetched again and the damaged copy is never served)."""
        pack = self.store.pack_of(cid)
        if pack is None:
            return None
        try:
            data = self.store.load_chunk(cid)  # verified against its id
        except (CorruptData, OSError, StrataError):
            return None
        with self._lock:
            self._used[pack] = time.monotonic()
        return data

    def missing(self, ids: Iterable[bytes]) -> list[bytes]:
        return self.store.missing_chunks(ids)

    def put_many(self, chunks: list[tuple[bytes, bytes]]) -> int:
        """Keep verified chunks, durable when this returns, then make room if needed;
        CorruptData if any does not match its id (none of them is kept then)."""
        for cid, data in chunks:
            if content_id(data) != cid:
                raise CorruptData(f"chunk {cid.hex()[:16]} does not match its id: not cached")
        if not chunks:
            return 0
        added = sum(self.store.store_chunks([c for c, _ in chunks], [d for _, d in chunks]))
        self.store.flush()
        self.make_room()
        return added

    def stored_bytes(self) -> int:
        return sum(self.store.pack_sizes().values())

    def make_room(self) -> None:
        """Evict least recently used packs until the cache fits its limit."""
        packs = self.store.pack_sizes()
        now = time.monotonic()
        with self._lock:
            for name in packs:  # a pack is used when it is written (or first seen)
                self._used.setdefault(name, now)
            order = sorted(packs, key=lambda n: self._used[n])
        total = sum(packs.values())
        doomed = []
        for name in order:
            if total <= self.limit:
                break
            doomed.append(name)
            total -= packs[name]
            self.evicted_bytes += packs[name]
        self.store.evict_packs(doomed)
        with self._lock:
            for name in doomed:
                self._used.pop(name, None)

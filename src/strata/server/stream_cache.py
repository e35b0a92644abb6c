"""Compressed download streams, kept so that a fleet pays for compressing each one once.

Endpoints on the same base image lack the same chunks and ask for them in the same
batches, and compressing a 64 MiB batch at zstd level 19 costs the server most of a
minute of CPU: the first request pays for it, the others are served from here. An entry is
named by the BLAKE3 of the level and the set of chunk ids asked for (whatever their
order: the stream follows from them) and starts with the BLAKE3 of its body, so a damaged
file is rebuilt, never served. The oldest entries go once the cache grows past its size.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import blake3
from prometheus_client import Counter

from strata.server.metrics import STREAM_CACHE
from strata.store.backend import atomic_write

_DIGEST = 32
_STRIPES = 64  # requests for the same stream wait for one compression, not race to it


class StreamCache:
    def __init__(self, directory: Path, max_bytes: int = 4 << 30, metric: Counter = STREAM_CACHE):
        self.dir = Path(directory)
        self.metric = metric
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._locks = [threading.Lock() for _ in range(_STRIPES)]

    def get_or_make(self, level: int, ids: list[bytes], make: Callable[[], bytes]) -> bytes:
        """The stream for `ids` at `level`: from the cache, else `make()` (then kept)."""
        # The set of ids names the stream, not their order: shuffled ids must not make
        # the server compress the same batch again (the first request's order is kept;
        # receivers read a stream by id).
        key = blake3.blake3(bytes([level]) + b"".join(sorted(set(ids)))).hexdigest()
        with self._locks[int(key[:8], 16) % _STRIPES]:
            body = self._load(key)
            if body is not None:
                self.metric.labels("hit").inc()
                return body
            self.metric.labels("miss").inc()
            body = make()
            try:
                atomic_write(self.dir / key, blake3.blake3(body).digest() + body,
                             durable=False)  # a lost entry is only recomputed
                self._trim()
            except OSError:
                pass  # a full disk costs CPU later, never this download
            return body

    def _load(self, key: str) -> bytes | None:
        path = self.dir / key
        try:
            data = path.read_bytes()
        except OSError:  # absent, or the cache itself is unusable: compress afresh
            return None
        body = data[_DIGEST:]
        if len(data) < _DIGEST or blake3.blake3(body).digest() != data[:_DIGEST]:
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        return body

    def _trim(self) -> None:
        entries = []
        for p in self.dir.iterdir():
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if p.name.startswith("."):  # another request's entry being written
                if st.st_mtime < time.time() - 3600:  # ... or one a crash left behind
                    p.unlink(missing_ok=True)
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size

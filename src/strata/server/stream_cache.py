"""Compressed download streams, kept so that a fleet pays for compressing each one once.

Endpoints on the same base image lack the same chunks and ask for them in the same
batches, and compressing a 64 MiB batch at zstd level 19 costs the server most of a
minute of CPU: the first request pays for it, the others are served from here. An entry is
named by the BLAKE3 of the level and the set of chunk ids asked for (whatever their
order: the stream follows from them) and starts with the BLAKE3 of its body, so a damaged
file is rebuilt, never served. The oldest entries go once the cache grows past its size.

A stream being made is handed on as it is compressed (`stream`): the first request and
any that ask for the same batch meanwhile read the same pieces as they come, so an agent
sees its download advance (with an ETA) instead of a silent minute, and the compression
runs to the end and is kept even if they all hang up.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
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
        self._flights: dict[str, _Flight] = {}  # streams being made, by key

    def get_or_make(self, level: int, ids: list[bytes], make: Callable[[], bytes]) -> bytes:
        """The stream for `ids` at `level`: from the cache, else `make()` (then kept)."""
        # The set of ids names the stream, not their order: shuffled ids must not make
        # the server compress the same batch again (the first request's order is kept;
        # receivers read a stream by id).
        return self._get_or_make(self.key(level, ids), make, self.lookup)

    def kept(self, key: str, make: Callable[[], bytes]) -> bytes:
        """The entry named `key` (not a set of chunk ids: a layer's manifest), else
        `make()` (then kept); not counted as a download stream."""
        return self._get_or_make(key, make, self.peek)

    def _get_or_make(self, key: str, make: Callable[[], bytes],
                     load: Callable[[str], bytes | None]) -> bytes:
        with self.lock(key):
            body = load(key)
            if body is None:
                body = make()
                self.keep(key, body)
            return body

    def stream(self, level: int, ids: list[bytes],
               produce: Callable[[], Iterator[bytes]]) -> Iterator[bytes]:
        """The stream for `ids` at `level`, piece by piece: from the cache; else from the
        one being made for another request; else `produce()` is called here (what it
        raises, e.g. a chunk that cannot be read, is this request's error) and its pieces
        are made by a thread of their own, then kept."""
        key = self.key(level, ids)
        with self.lock(key):
            flight = self._flights.get(key)
            if flight is not None:
                self.metric.labels("hit").inc()
                return flight.read()
            body = self.lookup(key)
            if body is not None:
                return iter([body])
            flight = self._flights[key] = _Flight()
        try:
            pieces = produce()
        except BaseException as exc:
            self._land(key, flight, None, exc)
            raise
        threading.Thread(target=self._make, args=(key, flight, pieces), daemon=True,
                         name="stream-maker").start()
        return flight.read()

    def _make(self, key: str, flight: _Flight, pieces: Iterator[bytes]) -> None:
        parts: list[bytes] = []
        try:
            for piece in pieces:
                parts.append(piece)
                flight.add(piece)
        except BaseException as exc:  # told to every reader; the next request tries anew
            self._land(key, flight, None, exc)
            return
        self._land(key, flight, b"".join(parts), None)

    def _land(self, key: str, flight: _Flight, body: bytes | None,
              error: BaseException | None) -> None:
        if body is not None:
            self.keep(key, body)  # before the flight ends: a new request finds it here
        with self.lock(key):
            self._flights.pop(key, None)
        flight.end(error)

    @staticmethod
    def key(level: int, ids: list[bytes]) -> str:
        return blake3.blake3(bytes([level]) + b"".join(sorted(set(ids)))).hexdigest()

    def lock(self, key: str) -> threading.Lock:
        return self._locks[int(key[:8], 16) % _STRIPES]

    def lookup(self, key: str) -> bytes | None:
        """The stream kept under `key` (counted as a hit or a miss)."""
        body = self._load(key)
        self.metric.labels("miss" if body is None else "hit").inc()
        return body

    def peek(self, key: str) -> bytes | None:
        """The entry kept under `key`, not counted (an index entry, not a stream)."""
        return self._load(key)

    def keep(self, key: str, body: bytes) -> None:
        try:
            atomic_write(self.dir / key, blake3.blake3(body).digest() + body,
                         durable=False)  # a lost entry is only recomputed
            self._trim()
        except OSError:
            pass  # a full disk costs CPU later, never this download

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


class StreamBroken(Exception):
    """The stream a request was reading could not be made to the end."""


class _Flight:
    """The pieces of one stream as they are made, for any number of readers."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.done = False
        self.error: BaseException | None = None
        self.cond = threading.Condition()

    def add(self, piece: bytes) -> None:
        with self.cond:
            self.pieces.append(piece)
            self.cond.notify_all()

    def end(self, error: BaseException | None) -> None:
        with self.cond:
            self.done, self.error = True, error
            self.cond.notify_all()

    def read(self) -> Iterator[bytes]:
        i = 0
        while True:
            with self.cond:
                while i >= len(self.pieces) and not self.done:
                    self.cond.wait()
                fresh = self.pieces[i:]
                if not fresh:  # done, and all read
                    if self.error is not None:
                        raise StreamBroken(str(self.error)) from self.error
                    return
            i += len(fresh)
            yield from fresh

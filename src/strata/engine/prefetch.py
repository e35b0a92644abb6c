"""Read-ahead for backup: tell the kernel which files the readers will open next.

A reader that opens a file not in the page cache waits for the disk, one request at a
time, and its core idles meanwhile. This thread runs a little ahead of the readers and
asks for each coming file with posix_fadvise(WILLNEED), which starts the disk reads
without waiting for them, so the readers mostly find their data already cached. On a
cold cache this took the first backup of the benchmark tree from 8.4-8.5 s to 7.5 s.
"""

from __future__ import annotations

import os
import threading
from collections import deque

from .filechunks import open_for_read

AHEAD_BYTES = 128 << 20  # how far ahead of the readers to ask for: page cache, not RSS
PER_FILE_BYTES = 8 << 20  # of a large file, the start; the kernel's own read-ahead follows


class Prefetcher:
    """Files queued by `add` are hinted in order, at most AHEAD_BYTES beyond what the
    readers report `consumed`."""

    def __init__(self, ahead: int = AHEAD_BYTES) -> None:
        self._ahead = ahead
        self._queue: deque[list[tuple[bytes, int]]] = deque()
        self._cond = threading.Condition()
        self._issued = 0
        self._consumed = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def add(self, files: list[tuple[bytes, int]]) -> None:
        with self._cond:
            self._queue.append(files)
            self._cond.notify()

    def consumed(self, nbytes: int) -> None:
        with self._cond:
            self._consumed += nbytes
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (
                        not self._queue or self._issued - self._consumed > self._ahead):
                    self._cond.wait()
                if self._closed:
                    return
                files = self._queue.popleft()
            for path, size in files:
                _hint(path, min(size, PER_FILE_BYTES))
            with self._cond:
                self._issued += sum(size for _, size in files)


def _hint(path: bytes, length: int) -> None:
    try:
        fd = open_for_read(path)
    except OSError:
        return  # vanished or unreadable: the reader will report it
    try:
        os.posix_fadvise(fd, 0, length, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass  # a hint only
    finally:
        os.close(fd)

"""Backup's read-ahead: it hints files in order, stays a bounded distance ahead of the
readers, and never fails a backup over a file that is gone."""

from __future__ import annotations

import os
import threading
import time

from strata.engine import prefetch
from strata.engine.prefetch import Prefetcher


def _wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_stays_within_its_distance_of_the_readers(monkeypatch):
    hinted: list[bytes] = []
    lock = threading.Lock()

    def record(path, length):
        with lock:
            hinted.append(path)

    monkeypatch.setattr(prefetch, "_hint", record)
    p = Prefetcher(ahead=100)
    try:
        for n in range(5):
            p.add([(b"f%d" % n, 60)])
        # 60 + 60 = 120 is past 100: after the second batch it waits for the readers.
        _wait_for(lambda: len(hinted) == 2)
        time.sleep(0.2)
        assert hinted == [b"f0", b"f1"]
        p.consumed(120)
        _wait_for(lambda: len(hinted) == 4)
        time.sleep(0.2)
        assert hinted == [b"f0", b"f1", b"f2", b"f3"]
    finally:
        start = time.monotonic()
        p.close()  # returns although it is waiting for the readers
        assert time.monotonic() - start < 2


def test_a_missing_file_is_skipped_and_the_rest_hinted(tmp_path, monkeypatch):
    (tmp_path / "a").write_bytes(b"x" * 10_000)
    done: list[bytes] = []
    real = prefetch._hint
    monkeypatch.setattr(prefetch, "_hint", lambda path, n: (real(path, n), done.append(path)))
    p = Prefetcher()
    p.add([(os.fsencode(tmp_path / "gone"), 10)])
    p.add([(os.fsencode(tmp_path / "a"), 10_000)])
    _wait_for(lambda: len(done) == 2)
    assert p._thread.is_alive()
    p.close()

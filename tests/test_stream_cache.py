"""The server's cache of compressed download streams: the fleet pays for compressing a
batch once, a damaged entry is rebuilt (never served), and the cache keeps to its size."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
import zstandard

from strata.errors import NotFound
from strata.server.services import layer_downloads, snapshots
from strata.server.stream_cache import StreamCache

IDS = [bytes([i]) * 32 for i in range(3)]


class Maker:
    def __init__(self, body: bytes = b"stream-body" * 100):
        self.body, self.calls = body, 0

    def __call__(self) -> bytes:
        self.calls += 1
        return self.body


def test_second_request_for_a_batch_costs_no_compression(tmp_path):
    cache, make = StreamCache(tmp_path), Maker()
    first = cache.get_or_make(19, IDS, make)
    again = StreamCache(tmp_path).get_or_make(19, IDS, make)  # a restarted server too
    assert first == again == make.body and make.calls == 1
    cache.get_or_make(19, IDS[:2], make)  # another batch
    cache.get_or_make(3, IDS, make)  # the same batch at another level
    assert make.calls == 3


def test_damaged_entry_is_rebuilt_not_served(tmp_path):
    cache, make = StreamCache(tmp_path), Maker()
    cache.get_or_make(19, IDS, make)
    (entry,) = [p for p in tmp_path.iterdir()]
    data = bytearray(entry.read_bytes())
    data[-1] ^= 0xFF
    entry.write_bytes(bytes(data))
    assert cache.get_or_make(19, IDS, make) == make.body and make.calls == 2
    entry.write_bytes(b"short")  # truncated
    assert cache.get_or_make(19, IDS, make) == make.body and make.calls == 3


def test_oldest_entries_go_when_the_cache_is_full(tmp_path):
    body = os.urandom(1000)
    cache = StreamCache(tmp_path, max_bytes=3500)
    for i in range(5):
        cache.get_or_make(19, [bytes([i]) * 32], Maker(body))
        past = time.time() - 100 + i  # distinct ages: entry i is older than entry i+1
        os.utime(max(tmp_path.iterdir(), key=lambda p: p.stat().st_mtime_ns), (past, past))
    kept = list(tmp_path.iterdir())
    assert len(kept) == 3 and sum(p.stat().st_size for p in kept) <= 3500
    make = Maker(body)
    cache.get_or_make(19, [bytes([4]) * 32], make)  # the newest survived
    cache.get_or_make(19, [bytes([0]) * 32], make)  # the oldest did not
    assert make.calls == 1


def test_an_unusable_cache_still_serves_the_stream(tmp_path):
    """A full disk or a broken cache directory costs CPU later, never a download."""
    cache, make = StreamCache(tmp_path / "cache"), Maker()
    (tmp_path / "cache").rmdir()
    (tmp_path / "cache").write_bytes(b"")  # nothing can be read or written under it now
    assert cache.get_or_make(19, IDS, make) == make.body
    assert cache.get_or_make(19, IDS, make) == make.body and make.calls == 2


def test_a_layer_manifest_is_compressed_once_for_the_fleet(tmp_path, monkeypatch):
    """Each endpoint of a layer asks for its manifest: the server reads and compresses it
    once, and still refuses it to an endpoint the layer is not assigned to."""
    manifests = {"a" * 64: b"manifest of layer a" * 500, "b" * 64: b"manifest of b" * 500}
    reads: list[str] = []

    def manifest_bytes(ctx, sid, what="snapshot"):
        reads.append(sid)
        return manifests[sid]

    monkeypatch.setattr(snapshots, "manifest_bytes", manifest_bytes)
    assigned = {"ep1": {"a" * 64, "b" * 64}, "ep2": {"a" * 64}}
    monkeypatch.setattr(layer_downloads, "allowed_snapshots", lambda ctx, ep: assigned[ep])
    ctx = SimpleNamespace(streams=StreamCache(tmp_path))
    bodies = [layer_downloads.layer_manifest(ctx, ep, "a" * 64) for ep in ("ep1", "ep2")]
    assert bodies[0] == bodies[1] and reads == ["a" * 64]
    assert zstandard.ZstdDecompressor().decompress(bodies[0]) == manifests["a" * 64]
    layer_downloads.layer_manifest(ctx, "ep1", "b" * 64)
    assert reads == ["a" * 64, "b" * 64]
    with pytest.raises(NotFound):
        layer_downloads.layer_manifest(ctx, "ep2", "b" * 64)  # kept, but not ep2's

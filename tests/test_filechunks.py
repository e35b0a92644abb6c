"""Reading files into chunks: streaming in blocks must cut exactly where one pass would,
or the same file would dedup differently depending on its size."""

from __future__ import annotations

import os
import random

import pytest

from strata.engine import filechunks
from strata.engine.filechunks import FileHasher, read_chunks
from strata.model.ids import content_id
from strata.store.chunker import Chunker, ChunkerParams


@pytest.mark.parametrize("size", [0, 1, 16 * 1024, 1 << 20, (1 << 20) + 1, 3_500_017,
                                  5 << 20])
def test_streamed_chunks_match_one_pass(tmp_path, size):
    rng = random.Random(size)
    # Runs of repeated bytes between random ones: cut points land everywhere, and some
    # chunks end at max_size, where a block boundary is most likely to disturb them.
    data = b"".join(rng.randbytes(rng.randrange(1, 300_000)) + bytes(rng.randrange(300_000))
                    for _ in range(40))[:size]
    path = tmp_path / "f"
    path.write_bytes(data)
    chunker = Chunker(ChunkerParams())
    streamed = [bytes(c) for c in read_chunks(chunker, os.fsencode(path), size)]
    assert b"".join(streamed) == data
    assert streamed == [bytes(c) for c in chunker.cut(data)]


def test_small_read_block_still_matches(tmp_path, monkeypatch):
    """A block smaller than a chunk's maximum: blocks are joined until a cut is final."""
    monkeypatch.setattr(filechunks, "READ_BLOCK", 64 * 1024)
    data = random.Random(7).randbytes(3 << 20)
    path = tmp_path / "f"
    path.write_bytes(data)
    chunker = Chunker(ChunkerParams())
    streamed = [bytes(c) for c in read_chunks(chunker, os.fsencode(path), len(data))]
    assert streamed == [bytes(c) for c in chunker.cut(data)]


def test_file_hash_is_blake3_of_the_whole_file():
    data = random.Random(3).randbytes(600_000)
    hasher = FileHasher()
    for piece in Chunker(ChunkerParams()).cut(data):
        hasher.add(piece)
    fc = hasher.result()
    assert fc.content_hash == content_id(data) and fc.size == len(data)
    assert len(fc.chunks) > 1


class _MemorySink:
    """Keeps chunks in a dict and records each `store_chunks` call."""

    def __init__(self) -> None:
        self.chunker = Chunker(ChunkerParams())
        self.chunks: dict[bytes, bytes] = {}
        self.calls = 0

    def store_chunk(self, cid, data):
        return self.store_chunks([cid], [data])[0]

    def store_chunks(self, ids, chunks):
        self.calls += 1
        added = []
        for cid, data in zip(ids, chunks, strict=True):
            assert content_id(data) == cid
            added.append(0 if cid in self.chunks else len(data))
            self.chunks.setdefault(cid, bytes(data))
        return added


def _content(sink, fc):
    return b"".join(sink.chunks[cid] for cid, _ in fc.chunks)


def test_a_batch_of_small_files_is_one_store_call(tmp_path):
    rng = random.Random(11)
    files = []
    for n in range(40):
        data = rng.randbytes(rng.randrange(0, 200_000))
        (tmp_path / str(n)).write_bytes(data)
        files.append((os.fsencode(tmp_path / str(n)), len(data), data))
    sink = _MemorySink()
    stored = filechunks.Stored()
    seen = []
    out = filechunks.archive_files(sink, [(p, n) for p, n, _ in files], stored, seen.append)
    assert sink.calls == 1
    assert [_content(sink, fc) for fc in out] == [d for _, _, d in files]
    assert [fc.content_hash for fc in out] == [content_id(d) for _, _, d in files]
    assert sum(seen) == stored.new_bytes == sum(n for _, n, _ in files)


def test_batch_survives_files_that_vanish_grow_or_shrink(tmp_path):
    """Files change between the scan and the read: each gets what it holds at read time,
    or its own error, and the rest of the batch is stored as usual."""
    rng = random.Random(5)
    grown, shrunk, kept = rng.randbytes(3 << 20), rng.randbytes(1000), rng.randbytes(70_000)
    (tmp_path / "grown").write_bytes(grown)  # stat said 10 bytes
    (tmp_path / "shrunk").write_bytes(shrunk)  # stat said 90,000
    (tmp_path / "kept").write_bytes(kept)
    batch = [(os.fsencode(tmp_path / "grown"), 10), (os.fsencode(tmp_path / "gone"), 500),
             (os.fsencode(tmp_path / "shrunk"), 90_000), (os.fsencode(tmp_path / "kept"),
                                                          len(kept))]
    sink = _MemorySink()
    out = filechunks.archive_files(sink, batch, filechunks.Stored())
    assert isinstance(out[1], FileNotFoundError)
    assert _content(sink, out[0]) == grown and out[0].size == len(grown)
    assert _content(sink, out[2]) == shrunk and out[2].size == len(shrunk)
    assert _content(sink, out[3]) == kept

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

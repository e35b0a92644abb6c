"""Reading one file into chunks: cut with FastCDC, hash with BLAKE3, hand each to the sink.

This is the CPU-heavy inner loop of backup. It runs on backup's reader threads: reading,
cutting (pyfastcdc), hashing (blake3) and compressing (zstandard) all run in C code that
releases the GIL, so threads keep every core busy without the memory of worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import blake3

from strata.model.ids import content_id
from strata.store.chunker import Chunker
from strata.tree.scan import open_path

# Files up to this size are read in one call; larger ones stream through one buffer of
# this size plus two maximal chunks (1.5 MiB), however large the file (memory stays flat).
READ_BLOCK = 1 << 20
_BATCH_CHUNKS = 256  # chunks of small files handed to the sink at once
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW


@dataclass(slots=True)
class FileChunks:
    chunks: list[tuple[bytes, int]]
    content_hash: bytes
    size: int


@dataclass(slots=True)
class Stored:
    """What archiving a file added to the sink."""

    new_bytes: int = 0  # raw bytes of chunks the sink did not hold
    stored_bytes: int = 0  # what those took once encoded
    new_chunks: int = 0


class ChunkStore(Protocol):
    chunker: Chunker

    def store_chunk(self, cid: bytes, data: bytes | memoryview) -> int: ...

    def store_chunks(self, ids: list[bytes], chunks: list[bytes | memoryview]) -> list[int]:
        """`store_chunk` for several at once; the bytes each added. One by one here; a sink
        that can look many up at once (the local store: one index query) overrides it."""
        return [self.store_chunk(cid, data) for cid, data in zip(ids, chunks, strict=True)]


def open_for_read(path: bytes) -> int:
    try:
        # O_NOATIME keeps backups from touching atime; only the owner (or root) may ask.
        return open_path(path, _OPEN_FLAGS | getattr(os, "O_NOATIME", 0))
    except PermissionError:
        return open_path(path, _OPEN_FLAGS)


def read_chunks(chunker: Chunker, path: bytes, size: int) -> Iterator[memoryview | bytes]:
    """Yield the file's chunks; cut points match chunking the whole file at once."""
    for block in read_blocks(chunker, path, size):
        yield from block


def read_whole(path: bytes, size: int) -> bytes | None:
    """A small file's bytes with one read call (open, read, close: a file object costs
    twice the system calls, and most files are small). None if the file has grown past
    `size` since stat: the caller streams it instead of holding however much it now is."""
    fd = open_for_read(path)
    try:
        data = os.read(fd, size + 1)
        if len(data) < size:  # shrank since stat, or a short read: go on to EOF
            parts, got = [data], len(data)
            while got <= size and (part := os.read(fd, size + 1 - got)):
                parts.append(part)
                got += len(part)
            data = b"".join(parts)
        return data if len(data) <= size else None
    finally:
        os.close(fd)


def read_blocks(chunker: Chunker, path: bytes, size: int) -> Iterator[list[memoryview | bytes]]:
    """The file's chunks, a list per read: the whole file up to READ_BLOCK, else per
    refill of one buffer (no fresh buffer per block, built holding the GIL). Use each list
    before asking for the next: after the file's first chunk, they view that buffer."""
    if size <= READ_BLOCK:
        data = read_whole(path, size)
        if data is not None:
            yield list(chunker.cut(data))
            return
    with os.fdopen(open_for_read(path), "rb", buffering=0) as f:
        # Stream: fill the buffer, cut it, keep what follows the last cut at its front and
        # refill behind it. A cut is final only with max_size bytes after it, so only a full
        # buffer (a block plus twice that) is cut before the end of the file.
        view = memoryview(bytearray(READ_BLOCK + 2 * chunker.params.max_size))
        have, first = 0, True
        while True:
            n = f.readinto(view[have:])
            have += n
            if n and have < len(view):
                continue
            pieces: list[memoryview | bytes] = list(chunker.cut(view[:have]))
            if n:  # not the end: the last piece may grow with the next bytes
                keep = len(pieces.pop())
                tail = bytes(view[have - keep:have])
            if first and pieces:
                pieces[0] = bytes(pieces[0])  # FileHasher keeps the first chunk
                first = False
            if pieces:
                yield pieces
            if not n:
                return
            view[:keep] = tail
            have = keep


class FileHasher:
    """Chunk ids plus the whole-file BLAKE3; a one-chunk file's hash is its chunk id, so
    the common small file is hashed once, not twice."""

    def __init__(self) -> None:
        self.chunks: list[tuple[bytes, int]] = []
        self.size = 0
        self._first: memoryview | bytes | None = None
        self._hasher: blake3.blake3 | None = None

    def add(self, data: memoryview | bytes) -> bytes:
        cid = content_id(data)
        if not self.chunks:
            self._first = data
        else:
            if self._hasher is None:
                assert self._first is not None  # set by the first add
                self._hasher = blake3.blake3(self._first)
                self._first = None
            self._hasher.update(data)
        self.chunks.append((cid, len(data)))
        self.size += len(data)
        return cid

    def result(self) -> FileChunks:
        if self._hasher is not None:
            digest = self._hasher.digest()
        else:
            digest = self.chunks[0][0] if self.chunks else content_id(b"")
        return FileChunks(self.chunks, digest, self.size)


def archive_file(sink: ChunkStore, path: bytes, size: int, stored: Stored,
                 on_bytes: Callable[[int], None] | None = None) -> FileChunks:
    """Read one file into `sink`, a read's worth of chunks at a time; count what was new
    into `stored`."""
    hasher = FileHasher()
    for block in read_blocks(sink.chunker, path, size):
        ids = [hasher.add(data) for data in block]
        _store(sink, ids, block, stored)
        if on_bytes is not None:
            on_bytes(sum(len(data) for data in block))
    return hasher.result()


def archive_files(sink: ChunkStore, files: list[tuple[bytes, int]], stored: Stored,
                  on_bytes: Callable[[int], None] | None = None) -> list[FileChunks | OSError]:
    """Read several files (path, size) into `sink`; each one's chunks, or the error that
    stopped it (vanished, unreadable). Small files share one `store_chunks` call, so a
    batch of them costs one index lookup, not one each; large ones stream on their own."""
    out: list[FileChunks | OSError] = []
    ids: list[bytes] = []
    pending: list[memoryview | bytes] = []
    small_bytes = 0  # read whole here; streamed files report their own progress
    for path, size in files:
        try:
            data = read_whole(path, size) if size <= READ_BLOCK else None
            if data is None:
                out.append(archive_file(sink, path, size, stored, on_bytes))
                continue
        except OSError as exc:
            out.append(exc)
            continue
        small_bytes += len(data)
        hasher = FileHasher()
        for piece in sink.chunker.cut(data):
            ids.append(hasher.add(piece))
            pending.append(piece)
        out.append(hasher.result())
        if len(pending) >= _BATCH_CHUNKS:
            _store(sink, ids, pending, stored)
            ids, pending = [], []
    if pending:
        _store(sink, ids, pending, stored)
    if on_bytes is not None:
        on_bytes(small_bytes)
    return out


def _store(sink: ChunkStore, ids: list[bytes], chunks: list[memoryview | bytes],
           stored: Stored) -> None:
    # A sink that cannot write raises StoreWriteFailed, not OSError, so that it stops the
    # backup instead of being taken for this file's read error.
    for data, added in zip(chunks, sink.store_chunks(ids, chunks), strict=True):
        if added:
            stored.new_bytes += len(data)
            stored.stored_bytes += added
            stored.new_chunks += 1

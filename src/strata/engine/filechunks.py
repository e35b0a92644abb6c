"""Reading one file into chunks: cut with FastCDC, hash with BLAKE3, compress with zstd.

This is the CPU-heavy inner loop of backup. It runs either in a worker thread (large
files, where the C libraries release the GIL) or in a worker process (the many small
files, where per-file Python work would otherwise serialize on the GIL).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import blake3

from strata.model.ids import content_id
from strata.store.chunker import Chunker, ChunkerParams
from strata.store.crypto import PlainCipher
from strata.store.pack import BlobCodec
from strata.tree.scan import open_path

READ_BLOCK = 8 << 20  # files above this are streamed through the chunker, not slurped
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW


@dataclass(slots=True)
class FileChunks:
    chunks: list[tuple[bytes, int]]
    content_hash: bytes
    size: int
    payloads: list[bytes] | None = None  # compressed, unsealed; parallel to `chunks`


def _open(path: bytes) -> int:
    try:
        # O_NOATIME keeps backups from touching atime; only the owner (or root) may ask.
        return open_path(path, _OPEN_FLAGS | getattr(os, "O_NOATIME", 0))
    except PermissionError:
        return open_path(path, _OPEN_FLAGS)


def read_chunks(chunker: Chunker, path: bytes, size: int) -> Iterator[memoryview | bytes]:
    """Yield the file's chunks; cut points match chunking the whole file at once."""
    with os.fdopen(_open(path), "rb", buffering=0) as f:
        if size <= READ_BLOCK:
            buf = f.read()
            # The file may have grown since stat: read the rest too.
            more = f.read() if len(buf) == size else b""
            yield from chunker.cut(buf + more if more else buf)
            return
        # Stream: keep the bytes after the last cut and prepend them to the next block.
        tail = b""
        while True:
            block = f.read(READ_BLOCK)
            buf = tail + block if tail else block
            if not block:
                if buf:
                    yield from chunker.cut(buf)
                return
            if len(buf) < chunker.params.max_size * 2:
                tail = buf
                continue
            pieces = list(chunker.cut(buf))
            yield from pieces[:-1]
            tail = bytes(pieces[-1])


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
                self._hasher = blake3.blake3(self._first)
                self._first = None
            self._hasher.update(data)
        self.chunks.append((cid, len(data)))
        self.size += len(data)
        return cid

    def result(self, payloads: list[bytes] | None = None) -> FileChunks:
        if self._hasher is not None:
            digest = self._hasher.digest()
        else:
            digest = self.chunks[0][0] if self.chunks else content_id(b"")
        return FileChunks(self.chunks, digest, self.size, payloads)


_worker: dict = {}


def init_worker(params: ChunkerParams, level: int) -> None:
    _worker["chunker"] = Chunker(params)
    _worker["codec"] = BlobCodec(PlainCipher(), level)


def chunk_file(chunker: Chunker, codec: BlobCodec, path: bytes, size: int) -> FileChunks:
    """A whole file's chunks, compressed payloads included."""
    hasher = FileHasher()
    payloads = []
    for data in read_chunks(chunker, path, size):
        hasher.add(data)
        payloads.append(codec.compress(data))
    return hasher.result(payloads)


def chunk_files(chunker: Chunker, codec: BlobCodec,
                files: list[tuple[bytes, int]]) -> list[FileChunks | OSError]:
    """A batch of files; a file that cannot be read is returned as its error."""
    out: list[FileChunks | OSError] = []
    for path, size in files:
        try:
            out.append(chunk_file(chunker, codec, path, size))
        except OSError as exc:
            out.append(exc)
    return out


def chunk_files_in_worker(files: list[tuple[bytes, int]]) -> list[FileChunks | OSError]:
    """Process-pool entry point: a batch of small files per task, one round trip."""
    return chunk_files(_worker["chunker"], _worker["codec"], files)

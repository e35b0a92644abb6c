"""Writing a file's content from its chunks: every byte, or, for a sparse file, holes
wherever a whole 4 KiB block of the file is zero.

Chunk boundaries fall anywhere (content-defined), so zeros are found per block of the
*file*, not per chunk: a chunk is cut at file offsets that are multiples of 4 KiB, and a
piece that is all zeros is skipped rather than written. A block whose two halves lie in
two chunks stays a hole when both halves are zero. The file must be new (unwritten bytes
read back as zeros) and is cut to its size at the end (a trailing hole).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

# The allocation unit of ext4, xfs and btrfs (and the page size): a smaller zero run saves
# nothing, since its block is allocated for the data beside it.
HOLE_BLOCK = 4096


def write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
    """Write all of `data` (at `offset`, or at the file position), retrying short writes."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


def write_chunks(fd: int, chunks: Iterable[bytes], *, sparse: bool) -> int:
    """Write `chunks` in order from offset 0 of the new file `fd`; returns the bytes
    delivered. With `sparse`, zero blocks become holes (the caller ftruncates to the
    size afterwards, which also makes a trailing hole)."""
    pos = 0
    for chunk in chunks:
        n = len(chunk)
        if not sparse:
            write_all(fd, chunk)
        else:
            if not isinstance(chunk, (bytes, bytearray)):
                chunk = bytes(chunk)  # a memoryview: count() needs bytes
            if chunk.count(0) != n:  # an all-zero chunk is one hole: nothing to write
                _write_sparse(fd, chunk, pos)
        pos += n
    return pos


def _write_sparse(fd: int, chunk: bytes | bytearray, pos: int) -> None:
    """Write the pieces of `chunk` (at file offset `pos`) that are not all zeros, cut at
    4 KiB boundaries of the file; neighbouring data pieces go out in one pwrite."""
    n = len(chunk)
    view = memoryview(chunk)
    start = -1  # where the pending run of data pieces begins, -1 if none
    i = 0
    end = min(n, (HOLE_BLOCK - pos % HOLE_BLOCK))
    while i < n:
        if chunk.count(0, i, end) == end - i:
            if start >= 0:
                write_all(fd, view[start:i], pos + start)
                start = -1
        elif start < 0:
            start = i
        i, end = end, min(n, end + HOLE_BLOCK)
    if start >= 0:
        write_all(fd, view[start:], pos + start)

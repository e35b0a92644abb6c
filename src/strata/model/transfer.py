"""Chunk bundles: the binary body that carries chunks between agent, server and reflector.

A bundle is MAGIC followed by records `id (32) | raw length (u32) | payload length (u32) |
payload`, where payload is the store's unsealed blob form (a flag byte, then zstd or raw
bytes). The receiver verifies every chunk against its id before using it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from strata.errors import CorruptData
from strata.model.ids import ID_LEN

MAGIC = b"STRXFER1"
_HEAD = struct.Struct(f"<{ID_LEN}sII")
MAX_RAW_CHUNK = 16 << 20  # larger than any chunker's max size


class BundleWriter:
    def __init__(self) -> None:
        self.parts: list[bytes] = [MAGIC]
        self.size = len(MAGIC)
        self.count = 0

    def add(self, cid: bytes, raw_length: int, payload: bytes) -> None:
        self.parts.append(_HEAD.pack(cid, raw_length, len(payload)))
        self.parts.append(payload)
        self.size += _HEAD.size + len(payload)
        self.count += 1

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


def read_bundle(data: bytes) -> Iterator[tuple[bytes, int, bytes]]:
    """Yield (id, raw length, payload); raise CorruptData on any framing error."""
    if not data.startswith(MAGIC):
        raise CorruptData("not a chunk bundle (bad magic)")
    view = memoryview(data)
    pos = len(MAGIC)
    while pos < len(data):
        if pos + _HEAD.size > len(data):
            raise CorruptData("chunk bundle is truncated")
        cid, raw_length, plen = _HEAD.unpack_from(view, pos)
        pos += _HEAD.size
        if plen > len(data) - pos:
            raise CorruptData("chunk bundle is truncated")
        if raw_length > MAX_RAW_CHUNK or plen > MAX_RAW_CHUNK + 64:
            raise CorruptData("chunk in bundle is too large")
        yield cid, raw_length, bytes(view[pos:pos + plen])
        pos += plen


STREAM_MAGIC = b"STRXFZ01"
MAX_STREAM_RAW = 256 << 20  # decompressed size a receiver accepts for one stream


def pack_stream(chunks: list[tuple[bytes, bytes]], level: int) -> bytes:
    """Chunks (id, raw bytes) as one zstd stream: compressing what travels together, not
    chunk by chunk, finds the redundancy between chunks (downloads of layer updates)."""
    import zstandard

    inner = BundleWriter()
    for cid, raw in chunks:
        inner.add(cid, len(raw), b"\x00" + raw)  # flag 0: raw, the stream compresses
    cctx = zstandard.ZstdCompressor(level=level, threads=-1 if level >= 10 else 0)
    return STREAM_MAGIC + cctx.compress(inner.getvalue())


def read_stream(data: bytes) -> Iterator[tuple[bytes, int, bytes]]:
    """The records of a `pack_stream` body; CorruptData if it is not one or too large."""
    import zstandard

    if not data.startswith(STREAM_MAGIC):
        raise CorruptData("not a chunk stream (bad magic)")
    try:
        dctx = zstandard.ZstdDecompressor()
        reader = dctx.stream_reader(memoryview(data)[len(STREAM_MAGIC):])
        inner = reader.read(MAX_STREAM_RAW + 1)
    except zstandard.ZstdError as exc:
        raise CorruptData(f"chunk stream does not decompress: {exc}") from None
    if len(inner) > MAX_STREAM_RAW:
        raise CorruptData("chunk stream is too large")
    return read_bundle(inner)

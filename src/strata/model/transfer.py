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

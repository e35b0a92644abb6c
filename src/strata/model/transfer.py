"""Chunk bundles: the binary body that carries chunks between agent, server and reflector.

A bundle is MAGIC followed by records `id (32) | raw length (u32) | payload length (u32) |
payload`, where payload is the store's unsealed blob form (a flag byte, then zstd or raw
bytes). The receiver verifies every chunk against its id before using it.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from typing import IO, Protocol, cast

from strata.errors import CorruptData
from strata.model.ids import ID_LEN

MAGIC = b"STRXFER1"
_HEAD = struct.Struct(f"<{ID_LEN}sII")
MAX_RAW_CHUNK = 16 << 20  # larger than any chunker's max size


def bundle_record(cid: bytes, raw_length: int, payload: bytes) -> bytes:
    """One record of a bundle (what follows MAGIC)."""
    return _HEAD.pack(cid, raw_length, len(payload)) + payload


class BundleWriter:
    def __init__(self) -> None:
        self.parts: list[bytes] = [MAGIC]
        self.ids: list[bytes] = []  # the id of each record, in order (parts[1:])
        self.size = len(MAGIC)
        self.count = 0

    def add(self, cid: bytes, raw_length: int, payload: bytes) -> None:
        self.parts.append(bundle_record(cid, raw_length, payload))
        self.ids.append(cid)
        self.size += _HEAD.size + len(payload)
        self.count += 1

    def getvalue(self) -> bytes:
        return b"".join(self.parts)

    def subset(self, keep: set[bytes]) -> BundleWriter:
        """The records of the chunks in `keep`, as a bundle of their own (what is left to
        send of a bundle the server kept part of)."""
        out = BundleWriter()
        for cid, record in zip(self.ids, self.parts[1:], strict=True):
            if cid in keep:
                out.parts.append(record)
                out.ids.append(cid)
                out.size += len(record)
                out.count += 1
        return out


class BundleParser:
    """A bundle decoded as its bytes arrive, in pieces of any size (an upload's body off
    the network): `feed` returns the records each piece completes, so a receiver can keep
    every chunk that arrived whole before a connection broke. Holds at most one record's
    worth of bytes; a record may declare no more than `max_raw` raw and `max_payload`
    payload bytes (refused at its header, before any of its payload is held)."""

    def __init__(self, max_raw: int = MAX_RAW_CHUNK, max_payload: int = MAX_RAW_CHUNK + 64):
        self.max_raw, self.max_payload = max_raw, max_payload
        self._buffer = bytearray()
        self._magic_seen = False
        self._head: tuple[bytes, int, int] | None = None  # the record being received
        self._error: CorruptData | None = None  # the framing error that ended the input

    def feed(self, data: bytes) -> list[tuple[bytes, int, bytes]]:
        """The (id, raw length, payload) of each record `data` completes. A framing error
        is raised (CorruptData) once the records before it are handed on: at once if
        there are none, else at the next call (`feed(b"")` asks). Nothing is decoded
        after it."""
        if self._error is not None:
            raise self._error
        self._buffer += data
        out: list[tuple[bytes, int, bytes]] = []
        try:
            self._parse(out)
        except CorruptData as exc:
            self._error = exc
            self._buffer.clear()
            if not out:
                raise
        return out

    def _parse(self, out: list[tuple[bytes, int, bytes]]) -> None:
        if not self._magic_seen:
            if len(self._buffer) < len(MAGIC):
                if not MAGIC.startswith(bytes(self._buffer)):
                    raise CorruptData("not a chunk bundle (bad magic)")
                return
            if self._buffer[:len(MAGIC)] != MAGIC:
                raise CorruptData("not a chunk bundle (bad magic)")
            del self._buffer[:len(MAGIC)]
            self._magic_seen = True
        start = 0
        try:
            while True:
                if self._head is None:
                    if len(self._buffer) - start < _HEAD.size:
                        break
                    cid, raw_length, plen = _HEAD.unpack_from(self._buffer, start)
                    start += _HEAD.size
                    if raw_length > self.max_raw or plen > self.max_payload:
                        raise CorruptData(f"chunk {cid.hex()[:16]} is larger than the "
                                          f"largest chunk accepted ({self.max_raw} bytes)")
                    self._head = (cid, raw_length, plen)
                cid, raw_length, plen = self._head
                if len(self._buffer) - start < plen:
                    break
                out.append((cid, raw_length, bytes(self._buffer[start:start + plen])))
                start += plen
                self._head = None
        finally:
            del self._buffer[:start]

    def close(self) -> None:
        """The input ended: CorruptData unless it ended between two records."""
        if self._error is not None:
            raise self._error
        if not self._magic_seen:
            raise CorruptData("not a chunk bundle (bad magic)")
        if self._head is not None or self._buffer:
            raise CorruptData("chunk bundle is truncated")


class Readable(Protocol):
    """Where a bundle or stream is read from: bytes in memory or a body arriving from the
    network (agent/client.py: BodyReader), piece by piece."""

    def read(self, n: int = -1, /) -> bytes: ...


def _read_exact(reader: Readable, n: int) -> bytes:
    """`n` bytes, or fewer only at the end of the input."""
    parts, got = [], 0
    while got < n:
        piece = reader.read(n - got)
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def iter_bundle(reader: Readable) -> Iterator[tuple[bytes, int, bytes]]:
    """Yield (id, raw length, payload) as each record arrives whole, so that a receiver
    keeps what came before a connection broke; CorruptData on any framing error."""
    if _read_exact(reader, len(MAGIC)) != MAGIC:
        raise CorruptData("not a chunk bundle (bad magic)")
    while True:
        head = _read_exact(reader, _HEAD.size)
        if not head:
            return
        if len(head) < _HEAD.size:
            raise CorruptData("chunk bundle is truncated")
        cid, raw_length, plen = _HEAD.unpack(head)
        if raw_length > MAX_RAW_CHUNK or plen > MAX_RAW_CHUNK + 64:
            raise CorruptData("chunk in bundle is too large")
        payload = _read_exact(reader, plen)
        if len(payload) < plen:
            raise CorruptData("chunk bundle is truncated")
        yield cid, raw_length, payload


def read_bundle(data: bytes) -> Iterator[tuple[bytes, int, bytes]]:
    """Yield (id, raw length, payload); raise CorruptData on any framing error."""
    if not data.startswith(MAGIC):
        raise CorruptData("not a chunk bundle (bad magic)")
    return iter_bundle(io.BytesIO(data))


STREAM_MAGIC = b"STRXFZ01"
MAX_STREAM_RAW = 256 << 20  # decompressed size a receiver accepts for one stream
MAX_STREAM_BYTES = 64 << 20  # raw bytes a server sends in one download response


STREAM_WINDOW_LOG = 26  # 64 MiB: a whole download batch; decoders allow up to 2**27


STREAM_PIECE = 1 << 20  # raw bytes compressed before the output so far is handed on


def pack_stream(chunks: list[tuple[bytes, bytes]], level: int) -> bytes:
    """Chunks (id, raw bytes) as one zstd stream: compressing what travels together, not
    chunk by chunk, finds the redundancy between chunks (downloads of layer updates).

    The match window covers the whole stream (up to 64 MiB), not the level's default
    (8 MiB at level 19): a file that repeats one seen 30 MiB earlier still compresses.
    One thread: zstd's multi-threaded mode took about twice the memory per request (some
    90 MiB more at level 19 on a 64 MiB batch) and saved little time on 2 CPUs; a server
    serves many downloads at once anyway.
    """
    return b"".join(pack_stream_pieces(chunks, level))


def pack_stream_pieces(chunks: list[tuple[bytes, bytes]], level: int) -> Iterator[bytes]:
    """`pack_stream`, handed on as it is compressed: the output of each STREAM_PIECE of
    input (a flushed zstd block, in the same single frame), so that a receiver sees a
    64 MiB batch arrive, and can show its progress, while level 19 works through it
    (most of a minute), rather than nothing until the end."""
    import zstandard

    inner = BundleWriter()
    for cid, raw in chunks:
        inner.add(cid, len(raw), b"\x00" + raw)  # flag 0: raw, the stream compresses
    body = inner.getvalue()
    window = min(STREAM_WINDOW_LOG, max(17, (len(body) - 1).bit_length()))
    params = zstandard.ZstdCompressionParameters.from_level(level, window_log=window)
    cobj = zstandard.ZstdCompressor(compression_params=params).compressobj(size=len(body))
    yield STREAM_MAGIC
    view = memoryview(body)
    for start in range(0, len(body), STREAM_PIECE):
        out = cobj.compress(view[start:start + STREAM_PIECE]) + \
            cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        if out:
            yield out
    yield cobj.flush()


class _Inflated:
    """The decompressed side of a stream, bounded (a small body must not inflate into
    gigabytes) and with zstd's errors as CorruptData."""

    def __init__(self, reader: Readable):
        import zstandard

        self._zstd_error = zstandard.ZstdError
        source = cast(IO[bytes], reader)  # zstd needs only its read()
        self._inner = zstandard.ZstdDecompressor().stream_reader(source, read_size=16 << 10)
        self.total = 0

    def read(self, n: int = -1, /) -> bytes:
        try:
            data = self._inner.read(min(n, 1 << 20) if n >= 0 else 1 << 20)
        except self._zstd_error as exc:
            raise CorruptData(f"chunk stream does not decompress: {exc}") from None
        self.total += len(data)
        if self.total > MAX_STREAM_RAW:
            raise CorruptData("chunk stream is too large")
        return data


def iter_stream(reader: Readable) -> Iterator[tuple[bytes, int, bytes]]:
    """The records of a `pack_stream` body as they arrive (each one as soon as it is
    whole); CorruptData if it is not one or too large."""
    if _read_exact(reader, len(STREAM_MAGIC)) != STREAM_MAGIC:
        raise CorruptData("not a chunk stream (bad magic)")
    return iter_bundle(_Inflated(reader))


def read_stream(data: bytes) -> Iterator[tuple[bytes, int, bytes]]:
    """The records of a `pack_stream` body held in memory."""
    if not data.startswith(STREAM_MAGIC):
        raise CorruptData("not a chunk stream (bad magic)")
    return iter_stream(io.BytesIO(data))

"""Pack files: many stored blobs followed by a trailer that lists them.

Layout: MAGIC | blob... | sealed trailer | u32 trailer length | END_MAGIC.
The trailer alone lets the index be rebuilt from packs; a blob is a flag byte (raw or
zstd) and the payload, sealed by the store's cipher with the chunk id as associated data.
"""

from __future__ import annotations

import os
import struct
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import blake3
import zstandard

from strata.errors import CorruptData
from strata.model.ids import ID_LEN, content_id
from strata.store.crypto import Cipher, PlainCipher

MAGIC = b"STRPACK1"
END_MAGIC = b"STRPEND1"
_FOOTER = struct.Struct("<I8s")
_ENTRY = struct.Struct(f"<{ID_LEN}sQII")  # id, offset, stored length, raw length
_RAW, _ZSTD = 0, 1
TRAILER_AAD = b"strata-pack-trailer"
# Keep compressed output only when it saves at least this fraction: decompression is
# not free, and already-compressed data (media, archives) barely shrinks.
_MIN_SAVING = 0.03
_WRITE_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class PackEntry:
    id: bytes
    offset: int
    length: int
    raw_length: int


class BlobCodec:
    """Turns plaintext chunks into stored blobs and back, verifying ids on the way out."""

    def __init__(self, cipher: Cipher, level: int):
        self.cipher = cipher
        self.level = level
        # zstd contexts are not thread-safe; one per worker thread, reused across chunks.
        self._local = threading.local()

    def _cctx(self) -> zstandard.ZstdCompressor:
        ctx = getattr(self._local, "c", None)
        if ctx is None:
            ctx = self._local.c = zstandard.ZstdCompressor(level=self.level)
        return ctx

    def _dctx(self) -> zstandard.ZstdDecompressor:
        ctx = getattr(self._local, "d", None)
        if ctx is None:
            ctx = self._local.d = zstandard.ZstdDecompressor()
        return ctx

    def compress(self, data: bytes | memoryview) -> bytes:
        """The unsealed payload: a flag byte, then zstd output or the raw bytes."""
        if self.level > 0:
            packed = self._cctx().compress(data)
            if len(packed) < len(data) * (1 - _MIN_SAVING):
                return b"\x01" + packed
        return b"\x00" + bytes(data)

    def seal(self, cid: bytes, payload: bytes) -> bytes:
        return self.cipher.seal(payload, cid)

    def encode(self, cid: bytes, data: bytes | memoryview) -> bytes:
        return self.seal(cid, self.compress(data))

    def decode(self, cid: bytes, blob: bytes, raw_length: int) -> bytes:
        body = self.cipher.open(blob, cid)
        if not body:
            raise CorruptData(f"chunk {cid.hex()[:16]} is empty")
        flag, payload = body[0], memoryview(body)[1:]  # a view: no copy of the payload
        if flag == _ZSTD:
            try:
                # A crafted frame may claim a huge size; never allocate more than promised.
                if zstandard.frame_content_size(payload) not in (-1, raw_length):
                    raise zstandard.ZstdError("frame size does not match the index")
                data = self._dctx().decompress(payload, max_output_size=raw_length)
            except zstandard.ZstdError as exc:
                raise CorruptData(f"chunk {cid.hex()[:16]} does not decompress: {exc}") from None
        elif flag == _RAW:
            data = bytes(payload)
        else:
            raise CorruptData(f"chunk {cid.hex()[:16]} has unknown encoding {flag}")
        if content_id(data) != cid:
            raise CorruptData(f"chunk {cid.hex()[:16]} does not match its id")
        return data


@dataclass(frozen=True, slots=True)
class FinishedPack:
    name: str  # hex BLAKE3 of the pack bytes
    path: Path  # durable temp file, ready to be moved into the store
    size: int
    entries: list[PackEntry]


_UNSEALED = BlobCodec(PlainCipher(), 0)


def decode_payload(cid: bytes, payload: bytes, raw_length: int) -> bytes:
    """Decode an unsealed payload (as chunk bundles carry them) and verify it against its
    id; raises CorruptData if it does not match."""
    return _UNSEALED.decode(cid, payload, raw_length)


class PackWriter:
    """Streams blobs into a temp file, hashing as it goes, so no pack sits in memory."""

    def __init__(self, cipher: Cipher, spool_dir: Path):
        self.cipher = cipher
        spool_dir.mkdir(parents=True, exist_ok=True)
        self.path = spool_dir / f"pack-{uuid.uuid4().hex}.tmp"
        self._file = open(self.path, "xb", buffering=_WRITE_BLOCK)  # noqa: SIM115 -- closed in finish
        self._hash = blake3.blake3()
        self._parts: list[bytes] = []
        self._gathered = 0
        self.size = 0
        self.entries: list[PackEntry] = []
        self._write(MAGIC)

    def _write(self, data: bytes) -> None:
        # Gathered into blocks: one hash update and one write call per MiB, not per blob
        # (each would hand the GIL over, and the writing threads' time is the backup's).
        self._parts.append(data)
        self._gathered += len(data)
        self.size += len(data)
        if self._gathered >= _WRITE_BLOCK:
            self._spill()

    def _spill(self) -> None:
        if not self._parts:
            return
        block = b"".join(self._parts) if len(self._parts) > 1 else self._parts[0]
        self._parts.clear()
        self._gathered = 0
        self._hash.update(block)
        self._file.write(block)

    def add(self, cid: bytes, blob: bytes, raw_length: int) -> None:
        self.entries.append(PackEntry(cid, self.size, len(blob), raw_length))
        self._write(blob)

    def finish(self) -> FinishedPack:
        """Append the trailer and make the file durable; the caller moves it into place."""
        trailer = b"".join(_ENTRY.pack(e.id, e.offset, e.length, e.raw_length)
                           for e in self.entries)
        sealed = self.cipher.seal(trailer, TRAILER_AAD)
        self._write(sealed)
        self._write(_FOOTER.pack(len(sealed), END_MAGIC))
        self._spill()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return FinishedPack(self._hash.hexdigest(), self.path, self.size, self.entries)

    def discard(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # its buffer could not be written (a full disk): it is being thrown away
        self.path.unlink(missing_ok=True)


def parse_trailer(tail: bytes, pack_size: int, cipher: Cipher) -> list[PackEntry]:
    """Parse the trailer from the last bytes of a pack (`tail` must include the footer)."""
    if len(tail) < _FOOTER.size:
        raise CorruptData("pack is too short to hold a trailer")
    tlen, magic = _FOOTER.unpack(tail[-_FOOTER.size:])
    if magic != END_MAGIC:
        raise CorruptData("pack has no end marker (truncated?)")
    if tlen + _FOOTER.size + len(MAGIC) > pack_size or tlen + _FOOTER.size > len(tail):
        raise CorruptData("pack trailer length is out of range")
    sealed = tail[-_FOOTER.size - tlen:-_FOOTER.size]
    trailer = cipher.open(sealed, TRAILER_AAD)
    if len(trailer) % _ENTRY.size:
        raise CorruptData("pack trailer is malformed")
    data_end = pack_size - _FOOTER.size - tlen
    entries = []
    for off in range(0, len(trailer), _ENTRY.size):
        e = PackEntry(*_ENTRY.unpack_from(trailer, off))
        if e.offset < len(MAGIC) or e.offset + e.length > data_end:
            raise CorruptData("pack trailer points outside the pack")
        entries.append(e)
    return entries


def trailer_read_size(pack_size: int, entries_hint: int = 4096) -> int:
    """How many tail bytes to read to likely get the whole trailer in one go."""
    return min(pack_size, _FOOTER.size + 64 + entries_hint * _ENTRY.size)


def footer_trailer_length(tail: bytes) -> int:
    tlen: int = _FOOTER.unpack(tail[-_FOOTER.size:])[0]
    return tlen + _FOOTER.size

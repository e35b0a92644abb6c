"""Content ids: BLAKE3-256 of plaintext, shown as hex."""

import blake3

ID_LEN = 32
ChunkId = bytes


def content_id(data: bytes | memoryview) -> ChunkId:
    """The BLAKE3-256 digest that names a chunk, a manifest or a pack."""
    return blake3.blake3(data).digest()


def to_hex(cid: bytes) -> str:
    return cid.hex()


def from_hex(text: str) -> bytes:
    raw = bytes.fromhex(text)
    if len(raw) != ID_LEN:
        raise ValueError(f"not a {ID_LEN}-byte id: {text!r}")
    return raw

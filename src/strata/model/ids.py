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


def is_hex_id(text: object) -> bool:
    """True for an id as the wire carries it (64 lowercase hex digits): safe to put in a
    file name or a URL path."""
    return (isinstance(text, str) and len(text) == 2 * ID_LEN
            and all(c in "0123456789abcdef" for c in text))

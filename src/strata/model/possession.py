"""Proof of possession: an endpoint shows it has a chunk's bytes without sending them, by
a keyed hash of the bytes under a fresh nonce the server chose (16 bytes, 48 on the wire
with the chunk's id, instead of up to 256 KiB). Knowing a chunk's id is not
enough: the id is an unkeyed hash of the same bytes, and the key changes with every
nonce. Shared by the agent (prove) and server (check)."""

from __future__ import annotations

import struct

import blake3

from strata.errors import CorruptData
from strata.model.ids import ID_LEN

_CONTEXT = "strata 2026 chunk possession proof v1"
PROOF_LEN = 16  # forging one without the bytes is a 2^-128 guess; the wire carries many


def proof(nonce: str, data: bytes | memoryview) -> bytes:
    """The proof for one chunk's raw bytes under `nonce` (as the server sent it)."""
    key = blake3.blake3(nonce.encode(), derive_key_context=_CONTEXT).digest()
    return blake3.blake3(data, key=key).digest(length=PROOF_LEN)


# A proof request's body: MAGIC | nonce length (u8) | nonce (ASCII) | (id | proof)...
MAGIC = b"STRPROV1"
MAX_NONCE = 128
MAX_PROOFS = 4_096  # per request: each costs the server a chunk read and a hash
_RECORD = ID_LEN + PROOF_LEN


def encode_proofs(nonce: str, proofs: list[tuple[bytes, bytes]]) -> bytes:
    raw = nonce.encode()
    return (MAGIC + struct.pack("B", len(raw)) + raw
            + b"".join(cid + p for cid, p in proofs))


def decode_proofs(data: bytes) -> tuple[str, dict[bytes, bytes]]:
    """(nonce, {chunk id: proof}); CorruptData for anything that is not such a body."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 1:
        raise CorruptData("not a proof request (bad magic)")
    n = data[len(MAGIC)]
    start = len(MAGIC) + 1 + n
    if n > MAX_NONCE or start > len(data):
        raise CorruptData("proof request: bad nonce")
    try:
        nonce = data[len(MAGIC) + 1:start].decode("ascii")
    except UnicodeDecodeError:
        raise CorruptData("proof request: bad nonce") from None
    body = memoryview(data)[start:]
    if len(body) % _RECORD or len(body) // _RECORD > MAX_PROOFS:
        raise CorruptData(f"proof request: 0 to {MAX_PROOFS} records of {_RECORD} bytes")
    records = (bytes(body[i:i + _RECORD]) for i in range(0, len(body), _RECORD))
    return nonce, {r[:ID_LEN]: r[ID_LEN:] for r in records}

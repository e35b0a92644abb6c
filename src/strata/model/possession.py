"""Proof of possession: an endpoint shows it has a chunk's bytes without sending them, by
a keyed hash of the bytes under a fresh nonce the server chose (16 bytes, about 100 on
the wire with the chunk's id, instead of up to 256 KiB). Knowing a chunk's id is not
enough: the id is an unkeyed hash of the same bytes, and the key changes with every
nonce. Shared by the agent (prove) and server (check)."""

from __future__ import annotations

import blake3

_CONTEXT = "strata 2026 chunk possession proof v1"
PROOF_LEN = 16  # forging one without the bytes is a 2^-128 guess; the wire carries many


def proof(nonce: str, data: bytes | memoryview) -> bytes:
    """The proof for one chunk's raw bytes under `nonce` (as the server sent it)."""
    key = blake3.blake3(nonce.encode(), derive_key_context=_CONTEXT).digest()
    return blake3.blake3(data, key=key).digest(length=PROOF_LEN)

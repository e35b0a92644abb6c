"""The server's side of proof of possession: nonces bound to one endpoint and a short
lifetime, minted without server-side state (a MAC under a key in the data directory), so
any server process sharing that directory checks any other's nonce."""

from __future__ import annotations

import hmac
import os
import secrets
import struct
import time
from pathlib import Path

import blake3

from strata.errors import Invalid

NONCE_SECONDS = 900  # long enough to hash a batch's chunks on a slow endpoint
_STAMP = struct.Struct(">Q")
_RANDOM = 16
_MAC = 16


class NonceMinter:
    def __init__(self, key_path: Path):
        self._key = _load_or_create(key_path)

    def _mac(self, endpoint: str, body: bytes) -> bytes:
        return blake3.blake3(endpoint.encode() + b"\0" + body, key=self._key).digest()[:_MAC]

    def mint(self, endpoint: str, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + NONCE_SECONDS)
        body = _STAMP.pack(expires) + secrets.token_bytes(_RANDOM)
        return (body + self._mac(endpoint, body)).hex()

    def check(self, endpoint: str, nonce: str, now: float | None = None) -> None:
        """Raise `Invalid` unless the server gave `nonce` to `endpoint` and it is fresh."""
        try:
            raw = bytes.fromhex(nonce)
        except ValueError:
            raise Invalid("the proof nonce is not one this server issued") from None
        body, mac = raw[:-_MAC], raw[-_MAC:]
        if (len(raw) != _STAMP.size + _RANDOM + _MAC
                or not hmac.compare_digest(mac, self._mac(endpoint, body))):
            raise Invalid("the proof nonce is not one this server issued")
        if _STAMP.unpack_from(body)[0] < (time.time() if now is None else now):
            raise Invalid("the proof nonce has expired: ask which chunks are missing again")


def _load_or_create(path: Path) -> bytes:
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # first writer wins; a racing process reads the winner's key
    except FileExistsError:
        key = path.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    return key

"""Encryption at rest: a random master key wrapped in a key file by a passphrase.

The master key (AES-256-GCM) never touches disk in the clear; the key file holds it
encrypted under a key derived from the passphrase with scrypt. Each stored blob carries
its own random nonce and is authenticated together with the id it claims to be, so a
swapped or altered blob fails to decrypt instead of restoring wrong bytes.
"""

from __future__ import annotations

import base64
import json
import os
from typing import TYPE_CHECKING, Any, Protocol

from strata.errors import CorruptData, WrongPassphrase

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# `cryptography` is imported when a key is used, not with this module: importing it took
# 40 ms of the 0.3 s start-up of every `strata` command, and unencrypted stores never
# need it.

NONCE_LEN = 12
TAG_LEN = 16
MASTER_KEY_PURPOSE = b"strata-master-key"
# scrypt's cost for a new key file: N=2^15, r=8, p=1 (32 MiB, 0.1 s here); each file
# records its own, so the cost can rise later. The test suite lowers it in its processes
# (tests/cost_factors.py): it derives some 370 keys a run.
SCRYPT_LOG_N = 15
# A key file asking for more is refused, not computed (key files can come from a shared
# bucket): scrypt takes 128 * r * N bytes, and p passes of that.
MAX_KDF_MEMORY, MAX_P = 1 << 30, 16


class Cipher(Protocol):
    overhead: int

    def seal(self, data: bytes, aad: bytes) -> bytes: ...
    def open(self, data: bytes, aad: bytes) -> bytes: ...


class PlainCipher:
    """No encryption: the identity transform (integrity still comes from content ids)."""

    overhead = 0

    def seal(self, data: bytes, aad: bytes) -> bytes:
        return data

    def open(self, data: bytes, aad: bytes) -> bytes:
        return data


class AesGcmCipher:
    overhead = NONCE_LEN + TAG_LEN

    def __init__(self, key: bytes):
        from cryptography.exceptions import InvalidTag
        self._aead = _aesgcm(key)
        self._invalid_tag = InvalidTag

    def seal(self, data: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        return nonce + self._aead.encrypt(nonce, data, aad)

    def open(self, data: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(data[:NONCE_LEN], data[NONCE_LEN:], aad)
        except self._invalid_tag:
            raise CorruptData("encrypted blob failed authentication") from None


def _aesgcm(key: bytes) -> AESGCM:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    return AESGCM(key)


def _kdf(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


def wrap_secret(secret: bytes, passphrase: str, purpose: bytes, *, n: int | None = None,
                r: int = 8, p: int = 1) -> dict[str, str | int]:
    """`secret` encrypted under a key derived from the passphrase (scrypt), as a JSON-able
    document; `purpose` is authenticated with it, so one kind of key file cannot be
    passed off as another."""
    n = n or 1 << SCRYPT_LOG_N
    salt = os.urandom(16)
    wrap = _aesgcm(_kdf(passphrase, salt, n, r, p))
    nonce = os.urandom(NONCE_LEN)
    return {
        "kdf": "scrypt", "n": n, "r": r, "p": p,
        "salt": base64.b64encode(salt).decode(),
        "cipher": "aes-256-gcm",
        "nonce": base64.b64encode(nonce).decode(),
        "key": base64.b64encode(wrap.encrypt(nonce, secret, purpose)).decode(),
    }


def unwrap_secret(doc: dict[str, Any], passphrase: str, purpose: bytes) -> bytes:
    """The secret of a wrap_secret document; a wrong passphrase raises WrongPassphrase."""
    try:
        salt = base64.b64decode(doc["salt"])
        n, r, p = int(doc["n"]), int(doc["r"]), int(doc["p"])
        if not (n >= 2 and n & (n - 1) == 0 and r >= 1 and 128 * r * n <= MAX_KDF_MEMORY
                and 1 <= p <= MAX_P):
            raise ValueError(f"scrypt cost n={n} r={r} p={p} is out of bounds")
        derived = _kdf(passphrase, salt, n, r, p)
        nonce = base64.b64decode(doc["nonce"])
        wrapped = base64.b64decode(doc["key"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptData(f"key file is malformed ({exc})") from None
    from cryptography.exceptions import InvalidTag
    try:
        return _aesgcm(derived).decrypt(nonce, wrapped, purpose)
    except InvalidTag:
        raise WrongPassphrase("wrong passphrase") from None


def make_key_file(passphrase: str, *, n: int | None = None, r: int = 8,
                  p: int = 1) -> tuple[bytes, bytes]:
    """Create a new master key; return (master key, key file bytes)."""
    master = os.urandom(32)  # what AESGCM.generate_key(256) returns
    doc = wrap_secret(master, passphrase, MASTER_KEY_PURPOSE, n=n, r=r, p=p)
    return master, json.dumps(doc, indent=1).encode()


def open_key_file(data: bytes, passphrase: str) -> bytes:
    """Unwrap the master key; a wrong passphrase raises WrongPassphrase."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise CorruptData(f"key file is malformed ({exc})") from None
    try:
        return unwrap_secret(doc, passphrase, MASTER_KEY_PURPOSE)
    except WrongPassphrase:
        raise WrongPassphrase("wrong passphrase for this store") from None

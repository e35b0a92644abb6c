"""Password hashes: scrypt (memory-hard), salted, with their parameters recorded in each
hash so that the cost can rise later without invalidating older hashes."""

from __future__ import annotations

import base64
import contextlib
import hmac
import secrets
import threading
from collections.abc import Iterator

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from strata.errors import StrataError

# scrypt with N=2^15, r=8, p=3: 32 MiB and 0.2-0.5 s per hash here, one of OWASP's
# recommended settings (the same strength as N=2^17, p=1, with a quarter of the memory,
# which matters when several sign-ins arrive at once on a small server).
SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P = 15, 8, 3
MAX_LOG_N = 20  # a stored hash asking for more is refused rather than computed
# Hashes computed at once: each takes 32 MiB, and every request thread (40) could be
# signing someone in. A sign-in waits up to HASH_WAIT seconds for its turn.
HASHES_AT_ONCE, HASH_WAIT = 4, 10.0
_turns = threading.BoundedSemaphore(HASHES_AT_ONCE)


class HashingBusy(StrataError):
    """Too many sign-ins at this moment: the caller should try again shortly."""

    http_status = 429


@contextlib.contextmanager
def _turn() -> Iterator[None]:
    if not _turns.acquire(timeout=HASH_WAIT):
        raise HashingBusy("the server is busy signing others in: try again in a moment")
    try:
        yield
    finally:
        _turns.release()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    with _turn():
        key = Scrypt(salt=salt, length=32, n=1 << SCRYPT_LOG_N, r=SCRYPT_R,
                     p=SCRYPT_P).derive(password.encode())
    return f"scrypt${SCRYPT_LOG_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def check_password(password: str, encoded: str) -> bool:
    try:
        kind, log_n, r, p, salt, key = encoded.split("$")
        if kind != "scrypt" or not 1 <= int(log_n) <= MAX_LOG_N:
            return False
        kdf = Scrypt(salt=_unb64(salt), length=32, n=1 << int(log_n), r=int(r), p=int(p))
        with _turn():
            got = kdf.derive(password.encode())
    except ValueError:  # a malformed hash (or none: no password login for this account)
        return False
    return hmac.compare_digest(got, _unb64(key))

"""Password hashes: scrypt (memory-hard), salted, with their parameters recorded in each
hash so that the cost can rise later without invalidating older hashes."""

from __future__ import annotations

import base64
import hmac
import secrets

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

# scrypt with N=2^15, r=8, p=3: 32 MiB and 0.2-0.5 s per hash here, one of OWASP's
# recommended settings (the same strength as N=2^17, p=1, with a quarter of the memory,
# which matters when several sign-ins arrive at once on a small server).
SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P = 15, 8, 3
MAX_LOG_N = 20  # a stored hash asking for more is refused rather than computed


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = Scrypt(salt=salt, length=32, n=1 << SCRYPT_LOG_N, r=SCRYPT_R,
                 p=SCRYPT_P).derive(password.encode())
    return f"scrypt${SCRYPT_LOG_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def check_password(password: str, encoded: str) -> bool:
    try:
        kind, log_n, r, p, salt, key = encoded.split("$")
        if kind != "scrypt" or not 1 <= int(log_n) <= MAX_LOG_N:
            return False
        got = Scrypt(salt=_unb64(salt), length=32, n=1 << int(log_n), r=int(r),
                     p=int(p)).derive(password.encode())
    except ValueError:  # a malformed hash (or none: no password login for this account)
        return False
    return hmac.compare_digest(got, _unb64(key))

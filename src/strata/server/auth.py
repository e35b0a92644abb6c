"""Credentials: the admin token, enrollment tokens and device credentials.

Secrets are random 256-bit tokens shown once; the catalog keeps only their SHA-256, so a
leaked catalog does not let anyone act as an admin or a device.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path


def new_secret(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def same_secret(secret: str, expected_digest: str) -> bool:
    return hmac.compare_digest(digest(secret), expected_digest)


def ensure_admin_token(data_dir: Path) -> tuple[Path, bool]:
    """Create DATA/admin.token (mode 0600) on first start; return (path, created)."""
    return ensure_token_file(data_dir / "admin.token", "sadm")


def ensure_token_file(path: Path, prefix: str) -> tuple[Path, bool]:
    """Create a token file (mode 0600) unless it exists; return (path, created)."""
    if path.exists():
        return path, False
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_secret(prefix) + "\n")
    return path, True


def write_token_file(path: Path, token: str) -> None:
    """Replace a token file atomically, readable by its owner only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_token_file(path: Path) -> str:
    return path.read_text().strip()


class TokenFile:
    """A token file's digest, read again whenever the file is replaced: a rotation made
    through one server process (a new file, renamed into place) is in force in every
    process sharing the data directory from their next request. Costs a stat."""

    def __init__(self, path: Path):
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._digest = ""

    def digest(self) -> str:
        st = self.path.stat()
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._seen:
            self._digest = digest(read_token_file(self.path))
            self._seen = stamp
        return self._digest

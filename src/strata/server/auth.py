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
    path = data_dir / "admin.token"
    if path.exists():
        return path, False
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_secret("sadm") + "\n")
    return path, True


def read_token_file(path: Path) -> str:
    return path.read_text().strip()

"""The server's data directory as a place for secrets: the admin token, the catalog (which
names every endpoint and file), the store's packs and the TLS key are readable by the
server's own user only."""

from __future__ import annotations

import os
from pathlib import Path


def lock_down(data_dir: Path) -> None:
    """Create `data_dir` (0700) or tighten it to 0700, and make everything this process
    creates from now on 0600 (directories 0700). Files made by an older version under a
    0700 directory are out of other users' reach whatever their own mode."""
    os.umask(0o077)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tighten(data_dir)


def tighten(directory: Path) -> None:
    if directory.is_dir() and directory.stat().st_mode & 0o077:
        os.chmod(directory, 0o700)

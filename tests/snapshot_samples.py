"""A small tree with every kind of entry a snapshot browser must show right."""

from __future__ import annotations

import os
import random
from pathlib import Path


def build_sample(root: Path, rng: random.Random) -> None:
    """Files of many sizes, nested folders, symlinks, a hardlink, odd modes and mtimes."""
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "docs" / "a.txt").write_bytes(b"hello\n")
    (root / "docs" / "deep" / "big.bin").write_bytes(rng.randbytes(900_000))
    (root / "docs" / "deep" / "er" / "zero").write_bytes(b"")
    (root / "docs" / "deep" / "er" / "mid.dat").write_bytes(rng.randbytes(70_000) * 2)
    (root / "script.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "script.sh", 0o750)
    os.chmod(root / "docs" / "a.txt", 0o600)
    os.chmod(root / "empty", 0o700)
    os.symlink("docs/a.txt", root / "link")
    os.symlink("../../nowhere", root / "docs" / "dangling")
    os.link(root / "docs" / "a.txt", root / "docs" / "hard")
    os.setxattr(root / "script.sh", "user.origin", b"tested")
    for i, p in enumerate(sorted(root.rglob("*"), reverse=True)):
        os.utime(p, ns=(1_600_000_000_123_456_789 + i * 10**9,) * 2, follow_symlinks=False)

"""Durable small files: a record replaced whole or not at all, even across a power cut."""

from __future__ import annotations

import os

from strata.tree.content import write_all


def replace_file(dir_fd: int, name: str, data: bytes) -> None:
    """Replace `name` in `dir_fd` with `data`: a temp file, fsynced, renamed over it, and
    the directory fsynced (the rename is on disk before this returns)."""
    tmp = f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dir_fd)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)

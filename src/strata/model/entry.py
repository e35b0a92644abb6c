"""One path of a tree, with everything needed to restore it stat for stat.

Paths are bytes relative to the tree root, '/'-separated, never absolute and never
containing '.' or '..' components (restore re-checks this: manifests can be crafted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class EntryType(StrEnum):
    FILE = "f"
    DIR = "d"
    SYMLINK = "l"
    HARDLINK = "h"  # a further name for the file at `link_target` (an earlier entry)
    FIFO = "p"
    CHARDEV = "c"
    BLOCKDEV = "b"


@dataclass(slots=True)
class Entry:
    path: bytes
    type: EntryType
    mode: int = 0o644  # permission bits incl. setuid/setgid/sticky (no file-type bits)
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    # Symlink target (raw bytes) or, for HARDLINK, the path of the first name of the inode.
    link_target: bytes = b""
    rdev: int = 0  # device number for CHARDEV/BLOCKDEV
    xattrs: dict[bytes, bytes] = field(default_factory=dict)  # incl. POSIX ACLs (system.*)
    sparse: bool = False  # restore zero chunks as holes
    content_hash: bytes = b""  # BLAKE3 of the whole file (FILE only)
    chunks: list[tuple[bytes, int]] = field(default_factory=list)  # (chunk id, length)
    # Files-cache keys: let the next backup skip unchanged files without reading them.
    ctime_ns: int = 0
    inode: int = 0
    dev: int = 0

    def same_stat(self, other: Entry) -> bool:
        """True when `other` is the same unchanged file as seen by stat (files cache)."""
        return (
            self.size == other.size
            and self.mtime_ns == other.mtime_ns
            and self.ctime_ns == other.ctime_ns
            and self.inode == other.inode
        )

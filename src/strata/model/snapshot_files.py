"""Schemas of the admin API's snapshot browsing (`/endpoints/{id}/snapshots/{snap}/…`),
shared by the server's routes and the CLI's admin client."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

MAX_LISTED = 5000  # entries in one answer; a larger folder is read page by page
MAX_CHUNKS = 256  # chunks in one answer (at most 64 MiB at the chunker's largest)


class SnapshotFileInfo(BaseModel):
    name: str  # as UTF-8; a name that is not has U+FFFD in place of its bad bytes
    raw_name: str | None = None  # hex of the bytes, only for a name that is not UTF-8
    type: str  # file, dir, symlink, fifo, chardev, blockdev
    size: int
    mode: str  # permission bits in octal, e.g. "0644"
    uid: int
    gid: int
    mtime: datetime
    link_target: str | None = None  # a symlink's target
    nlink: int = 1


class SnapshotFolder(BaseModel):
    endpoint: str
    snapshot: str
    path: str  # '' for the snapshot's root
    type: str  # dir, or the type of the one entry listed when PATH is not a folder
    total: int  # entries in the folder
    offset: int
    entries: list[SnapshotFileInfo]
    truncated: bool  # more entries follow: ask again with offset + len(entries)

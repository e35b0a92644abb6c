"""An in-place restore keeps what it replaces: every local file (or directory, symlink)
that differs from the snapshot's version is renamed aside to `NAME.strata-TIME` before
the restore writes over its path, so a newer edit is never lost silently.

Local paths are reached through directory fds from the root without following symlinks
(`tree.dirfd`), as restore itself does: a symlink planted in the tree cannot make the
rename touch anything outside it (such a path is left for the writer, which refuses it).
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from strata.errors import StrataError, UnsafePath
from strata.model.entry import Entry, EntryType
from strata.tree.dirfd import DirFds, lstat_at, split
from strata.tree.scan import display

from .restore import ChunkSource, select_entries

_KIND = {EntryType.FILE: stat.S_IFREG, EntryType.HARDLINK: stat.S_IFREG,
         EntryType.DIR: stat.S_IFDIR, EntryType.SYMLINK: stat.S_IFLNK,
         EntryType.FIFO: stat.S_IFIFO, EntryType.CHARDEV: stat.S_IFCHR,
         EntryType.BLOCKDEV: stat.S_IFBLK}


@dataclass(frozen=True)
class Displaced:
    """A local path the restore would replace, with what it holds now."""

    path: bytes
    size: int
    mtime_ns: int
    is_dir: bool

    def describe(self) -> str:
        when = datetime.fromtimestamp(self.mtime_ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        what = "directory" if self.is_dir else f"{self.size} bytes"
        return f"{display(self.path)} ({what}, modified {when})"


@dataclass(frozen=True)
class Kept:
    """Where the replaced version of `path` now is (relative to the root)."""

    path: bytes
    kept_as: bytes
    restored: bool = True  # False: the restore failed and the original was put back

    def to_dict(self) -> dict:
        return {"path": display(self.path), "kept_as": display(self.kept_as),
                "restored": self.restored}


def kept_suffix(now: float | None = None) -> bytes:
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return b".strata-" + stamp.strftime("%Y%m%dT%H%M%SZ").encode()


def _unchanged(entry: Entry, st: os.stat_result, first: dict[bytes, Entry],
               link: bytes | None) -> bool:
    """True when the local node is what the snapshot holds, so replacing it loses nothing."""
    if stat.S_IFMT(st.st_mode) != _KIND[entry.type]:
        return False
    if entry.type is EntryType.DIR:
        return True  # restore writes into it; nothing under it goes that is not listed
    if entry.type is EntryType.SYMLINK:
        return link == entry.link_target
    if entry.type is EntryType.HARDLINK:
        entry = first.get(entry.link_target, entry)
        if entry.type is not EntryType.FILE:
            return False
    if entry.type is EntryType.FILE:
        return st.st_size == entry.size and st.st_mtime_ns == entry.mtime_ns
    return True  # a FIFO or device node holds no data


def displaced_by(source: ChunkSource, snap: object, root: str | os.PathLike,
                 includes: list[str] | None) -> list[Displaced]:
    """The local paths under `root` that restoring `includes` of `snap` would replace and
    that differ from the snapshot's version (a newer edit, another kind of node)."""
    out: list[Displaced] = []
    first: dict[bytes, Entry] = {}
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fds = DirFds(root_fd)
    replaced_dirs: list[bytes] = []  # under a directory that goes aside, nothing else counts
    try:
        for entry in select_entries(source, snap, includes):  # type: ignore[arg-type]
            if entry.type is EntryType.FILE:
                first[entry.path] = entry
            if any(entry.path.startswith(d + b"/") for d in replaced_dirs):
                continue
            parent, name = split(entry.path)
            try:
                st = lstat_at(fds.get(parent), name)
                link = os.readlink(name, dir_fd=fds.get(parent)) \
                    if st is not None and stat.S_ISLNK(st.st_mode) else None
            except (FileNotFoundError, NotADirectoryError, UnsafePath):
                continue  # nothing there to lose, or a path the writer will refuse
            if st is None or _unchanged(entry, st, first, link):
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if is_dir:
                replaced_dirs.append(entry.path)
            out.append(Displaced(entry.path, st.st_size, st.st_mtime_ns, is_dir))
    finally:
        fds.close()
        os.close(root_fd)
    return out


def keep_aside(root: str | os.PathLike, displaced: list[Displaced],
               suffix: bytes) -> list[Kept]:
    """Rename each displaced path to NAME+suffix in its own directory (a name already
    taken gets -2, -3, …). Nothing is copied: the kept version is the very file. If one
    cannot be renamed, those already renamed go back and nothing is restored."""
    kept: list[Kept] = []
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fds = DirFds(root_fd)
    try:
        for d in displaced:
            parent, name = split(d.path)
            try:
                pfd = fds.get(parent)
                new, n = name + suffix, 1
                while lstat_at(pfd, new) is not None:
                    n += 1
                    new = name + suffix + b"-%d" % n
                os.rename(name, new, src_dir_fd=pfd, dst_dir_fd=pfd)
            except OSError as exc:
                _undo(fds, kept)
                raise StrataError(f"cannot keep the local {display(d.path)} aside: "
                                  f"{exc.strerror or exc}; nothing was restored") from None
            if d.is_dir:
                fds.forget(d.path)
            kept.append(Kept(d.path, (parent + b"/" if parent else b"") + new))
    finally:
        fds.close()
        os.close(root_fd)
    return kept


def _undo(fds: DirFds, kept: list[Kept]) -> None:
    for k in reversed(kept):
        try:
            pfd = fds.get(split(k.path)[0])
            os.rename(split(k.kept_as)[1], split(k.path)[1], src_dir_fd=pfd, dst_dir_fd=pfd)
        except (OSError, UnsafePath):
            pass  # it stays under its kept name, which the error's reader can find


def put_back_failed(root: str | os.PathLike, kept: list[Kept]) -> list[Kept]:
    """After the restore: a kept path whose restore failed (nothing is at the path now)
    is renamed back, so a damaged snapshot never costs the local version."""
    out: list[Kept] = []
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fds = DirFds(root_fd)
    try:
        for k in kept:
            parent, name = split(k.path)
            try:
                pfd = fds.get(parent)
            except (FileNotFoundError, UnsafePath):
                out.append(k)
                continue
            if lstat_at(pfd, name) is None:
                os.rename(split(k.kept_as)[1], name, src_dir_fd=pfd, dst_dir_fd=pfd)
                out.append(Kept(k.path, k.path, restored=False))
            else:
                out.append(k)
    finally:
        fds.close()
        os.close(root_fd)
    return out

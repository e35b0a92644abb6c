"""A snapshot's folder (or file) as a tar or zip stream, for downloads and exports.

Both are written piece by piece while the reader takes them: a file's bytes go out
chunk by chunk as they are fetched, so no file is ever whole in memory. Entries are
named by their path in the snapshot, parents included, so extracting the archive into a
folder gives what `strata store restore --include PATH` would.

What a safe restore leaves out is left out here too: device nodes, setuid/setgid bits
and privileged extended attributes (a snapshot may come from a compromised machine).
A tar keeps `user.*` xattrs (GNU tar's pax records: extract with `tar --xattrs`) but
no ACLs; a zip keeps no xattrs.
"""

from __future__ import annotations

import os
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator

from strata.model.entry import EntryType

from .snapshot_tree import ROOT_INODE, Attr, SnapshotTree

_SAFE_BITS = 0o1777  # permission bits kept: not setuid/setgid
_TAR_TYPES = {EntryType.FILE: tarfile.REGTYPE, EntryType.DIR: tarfile.DIRTYPE,
              EntryType.SYMLINK: tarfile.SYMTYPE, EntryType.FIFO: tarfile.FIFOTYPE}


# Which members an archive may hold: (snapshot path, attributes of the file it names);
# a folder refused takes everything beneath it along.
Keep = Callable[[bytes, Attr], bool]


def _members(tree: SnapshotTree, path: bytes,
             keep: Keep | None = None) -> Iterator[tuple[bytes, int]]:
    """(snapshot path, inode) of the parents of `path`, `path` itself, then everything
    beneath it; the root folder itself is not a member."""
    members = _all_members(tree, path)
    if keep is None:
        yield from members
        return
    refused: bytes | None = None  # the last folder refused: its subtree follows it
    for rel, ino in members:
        if refused is not None and rel.startswith(refused + b"/"):
            continue
        if keep(rel, tree.attr(tree.link_of(ino) or ino)):
            yield rel, ino
        elif tree.is_dir(ino):
            refused = rel


def _all_members(tree: SnapshotTree, path: bytes) -> Iterator[tuple[bytes, int]]:
    p = path.strip(b"/")
    if not p:
        yield from tree.walk(ROOT_INODE)
        return
    parts = p.split(b"/")
    for i in range(1, len(parts)):
        parent = b"/".join(parts[:i])
        yield parent, tree.resolve(parent)
    ino = tree.resolve(p)
    yield p, ino
    if tree.is_dir(ino):
        yield from tree.walk(ino, p + b"/")


def tar_stream(tree: SnapshotTree, path: bytes = b"",
               keep: Keep | None = None) -> Iterator[bytes]:
    """A POSIX (pax) tar of `path` (b"" for the whole snapshot); only the members `keep`
    accepts, if given."""
    first_name: dict[int, str] = {}  # a file with further names -> where it went first
    for rel, ino in _members(tree, path, keep):
        target = tree.link_of(ino) or ino
        a = tree.attr(target)
        if a.type not in _TAR_TYPES:
            continue  # device nodes
        name = os.fsdecode(rel)
        info = tarfile.TarInfo(name)
        info.mode = a.mode & _SAFE_BITS
        info.uid, info.gid = a.uid, a.gid
        info.mtime = a.mtime_ns // 10**9
        info.pax_headers = {"mtime": f"{a.mtime_ns // 10**9}.{a.mtime_ns % 10**9:09d}"}
        if a.type is not EntryType.SYMLINK:
            for key, value in tree.entry(target).xattrs.items():
                if key.startswith(b"user."):  # as GNU tar --xattrs writes them
                    info.pax_headers["SCHILY.xattr." + os.fsdecode(key)] = os.fsdecode(value)
        info.type = _TAR_TYPES[a.type]
        if a.type is EntryType.SYMLINK:
            info.linkname = os.fsdecode(tree.readlink(target))
        elif a.type is EntryType.FILE and target in first_name:
            info.type, info.linkname = tarfile.LNKTYPE, first_name[target]
        elif a.type is EntryType.FILE:
            info.size = a.size
            if a.nlink > 1:
                first_name[target] = name
        yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        if info.type == tarfile.REGTYPE:
            yield from tree.iter_content(target)
            if a.size % tarfile.BLOCKSIZE:
                yield tarfile.NUL * (tarfile.BLOCKSIZE - a.size % tarfile.BLOCKSIZE)
    yield tarfile.NUL * (tarfile.BLOCKSIZE * 2)


class _Sink:
    """Where zipfile writes: collected, then handed on by `take`."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes, /) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


def _zip_time(mtime_ns: int) -> tuple[int, int, int, int, int, int]:
    t = time.gmtime(max(mtime_ns // 10**9, 315_532_800))  # zip dates start in 1980
    return (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)


def zip_stream(tree: SnapshotTree, path: bytes = b"",
               keep: Keep | None = None) -> Iterator[bytes]:
    """A zip (deflate, zip64) of `path`; symlinks stored as Info-ZIP does (the target as
    content, S_IFLNK in the mode); hardlinks and FIFOs become plain copies and are left
    out, respectively. Names that are not UTF-8 are shown with U+FFFD in their place."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for rel, ino in _members(tree, path, keep):
            target = tree.link_of(ino) or ino
            a = tree.attr(target)
            if a.type not in (EntryType.FILE, EntryType.DIR, EntryType.SYMLINK):
                continue
            name = rel.decode("utf-8", "replace") + ("/" if a.type is EntryType.DIR else "")
            info = zipfile.ZipInfo(name, _zip_time(a.mtime_ns))
            info.external_attr = (a.st_mode & ~0o6000) << 16
            info.create_system = 3  # Unix: the mode above is meant
            if a.type is EntryType.DIR:
                zf.writestr(info, b"")
            elif a.type is EntryType.SYMLINK:
                zf.writestr(info, tree.readlink(target))
            else:
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w", force_zip64=True) as out:
                    for chunk in tree.iter_content(target):
                        out.write(chunk)
                        if sink.parts:
                            yield sink.take()
            yield sink.take()
    yield sink.take()


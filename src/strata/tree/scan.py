"""Walk a directory tree and describe every path under it as an Entry, in canonical order.

The walk holds a directory fd per level and works relative to it (fstatat, readlinkat,
openat with O_NOFOLLOW), so it never follows symlinks and copes with paths longer than
PATH_MAX.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Iterator

from strata.model.entry import Entry, EntryType
from strata.tree.excludes import ExcludeMatcher
from strata.tree.xattrs import read_xattrs

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Kernel limit for a path argument, NUL included; longer paths go through /proc/self/fd.
_PATH_MAX = 4096
_FS_ENCODING = sys.getfilesystemencoding()
_FILE, _DIR, _SYMLINK = EntryType.FILE, EntryType.DIR, EntryType.SYMLINK
_DEVICES = (EntryType.CHARDEV, EntryType.BLOCKDEV)
_TYPES = {
    stat.S_IFREG: EntryType.FILE,
    stat.S_IFDIR: EntryType.DIR,
    stat.S_IFLNK: EntryType.SYMLINK,
    stat.S_IFIFO: EntryType.FIFO,
    stat.S_IFCHR: EntryType.CHARDEV,
    stat.S_IFBLK: EntryType.BLOCKDEV,
}


def display(p: bytes) -> str:
    """A printable rendering of a path that may not be valid UTF-8."""
    return p.decode("utf-8", "backslashreplace")


def open_path(path: bytes, flags: int = os.O_RDONLY) -> int:
    """os.open that also reaches paths longer than PATH_MAX by walking directory fds.

    scan_tree yields such paths for deep trees; readers of file data should open with this.
    """
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
    parts = [p for p in path.split(b"/") if p]
    fd = os.open(b"/" if path.startswith(b"/") else b".", _DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return os.open(parts[-1], flags | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def device_of(st: os.stat_result) -> int:
    """The device a path is on (a seam: tests stand in other devices here)."""
    return st.st_dev


class _Level:
    """One directory being walked: its fd, paths, and the sorted names still to visit."""

    __slots__ = ("fd", "rel", "abs", "names")

    def __init__(self, fd: int, rel: bytes, abs_: bytes) -> None:
        self.fd = fd
        self.rel = rel  # b"" for the root, else b"a/b/"
        self.abs = abs_  # always ends with b"/"
        with os.scandir(fd) as it:
            # scandir(fd) yields str names (surrogateescape), which round-trip via encode.
            names = sorted((d.name.encode(_FS_ENCODING, "surrogateescape"), d) for d in it)
        names.reverse()  # pop() from the end visits names in ascending order
        self.names = names


def scan_tree(
    root: str | bytes | os.PathLike,
    excludes: ExcludeMatcher | None = None,
    errors: list[str] | None = None,
    *,
    one_file_system: bool = False,
    mounts: list[str] | None = None,
) -> Iterator[tuple[Entry, bytes]]:
    """Yield (entry, absolute path) for every path under `root`, in path_key order.

    Paths that vanish or cannot be read mid-scan are skipped and reported in `errors` as
    "path: reason" strings; sockets are skipped silently. Hardlinked regular files are
    yielded as FILE at their first name and HARDLINK (link_target = that name) after.

    `one_file_system`: stay on the root's device. A directory on another one (a mount
    point: a tmpfs, an NFS share, a USB disk) is yielded, empty, as restic and tar do, so
    the tree keeps its shape; what is mounted there is not walked, and the mount point is
    listed in `mounts`.
    """
    root_abs = os.path.abspath(os.fsencode(root))
    if excludes is not None and not excludes:
        excludes = None
    seen_inodes: dict[tuple[int, int], bytes] = {}
    proc_ok = os.path.isdir(b"/proc/self/fd")

    def note(rel: bytes, exc: BaseException) -> None:
        if errors is not None:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            errors.append(f"{display(rel)}: {reason}")

    # Hot loop (one pass per path): bind lookups locally.
    types_get, s_ifmt, s_imode = _TYPES.get, stat.S_IFMT, stat.S_IMODE
    readlink, xattrs_of = os.readlink, read_xattrs

    root_fd = os.open(root_abs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    root_dev = device_of(os.fstat(root_fd)) if one_file_system else None
    stack: list[_Level] = []
    try:
        try:
            stack.append(_Level(root_fd, b"", root_abs.rstrip(b"/") + b"/"))
        except BaseException:
            os.close(root_fd)
            raise
        while stack:
            level = stack[-1]
            if not level.names:
                os.close(level.fd)
                stack.pop()
                continue
            name, dirent = level.names.pop()
            rel = level.rel + name
            try:
                if excludes is not None and excludes.excluded(
                    rel, dirent.is_dir(follow_symlinks=False)
                ):
                    continue
                st = dirent.stat(follow_symlinks=False)
                etype = types_get(s_ifmt(st.st_mode))
                if etype is None:  # sockets (recreated by their daemons) and oddities
                    continue
                abs_path = level.abs + name
                if len(abs_path) < _PATH_MAX or not proc_ok:
                    xa_path = abs_path
                else:
                    xa_path = b"/proc/self/fd/%d/%s" % (level.fd, name)
                entry = Entry(
                    path=rel,
                    type=etype,
                    mode=s_imode(st.st_mode),
                    uid=st.st_uid,
                    gid=st.st_gid,
                    mtime_ns=st.st_mtime_ns,
                    xattrs=xattrs_of(xa_path),
                    ctime_ns=st.st_ctime_ns,
                    inode=st.st_ino,
                    dev=st.st_dev,
                )
                if etype is _FILE:
                    entry.size = st.st_size
                    entry.sparse = st.st_blocks * 512 < st.st_size
                    if st.st_nlink > 1:
                        key = (st.st_dev, st.st_ino)
                        first = seen_inodes.get(key)
                        if first is None:
                            seen_inodes[key] = rel
                        else:
                            entry.type = EntryType.HARDLINK
                            entry.link_target = first
                elif etype is _SYMLINK:
                    entry.link_target = readlink(name, dir_fd=level.fd)
                elif etype in _DEVICES:
                    entry.rdev = st.st_rdev
            except OSError as e:  # vanished, unreadable, or an I/O error on this one path
                note(rel, e)
                continue
            yield entry, abs_path
            if etype is _DIR and root_dev is not None and device_of(st) != root_dev:
                if mounts is not None:
                    mounts.append(display(rel))
                continue
            if etype is _DIR:
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=level.fd)
                except OSError as e:  # vanished, replaced by a symlink, unreadable, EMFILE
                    note(rel, e)
                    continue
                try:
                    stack.append(_Level(fd, rel + b"/", abs_path + b"/"))
                except OSError as e:
                    os.close(fd)
                    note(rel, e)
    finally:
        for level in stack:
            os.close(level.fd)

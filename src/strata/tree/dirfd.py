"""Directory fds beneath a held root, each reached one component at a time with
openat(O_NOFOLLOW): neither '..' nor a symlink (planted before or swapped in meanwhile)
can send a later call through it outside the root.

Restore (`tree.writer`) and the apply journal (`layers.apply`) reach every directory
they touch through `DirFds`, and name everything relative to the fds it hands out.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict

from strata.errors import UnsafePath
from strata.tree.scan import display

DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Deep trees are walked depth first: 64 fds keep every ancestor of the current path
# cached without approaching the process's fd limit.
_CACHE_SIZE = 64


def split(rel: bytes) -> tuple[bytes, bytes]:
    """(parent, name) of a relative path; the root's children have parent b""."""
    parent, _, name = rel.rpartition(b"/")
    return parent, name


def lstat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
    """lstat of `name` in `dir_fd`, or None if nothing is there."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def exists_at(dir_fd: int, name: bytes) -> bool:
    return lstat_at(dir_fd, name) is not None


def is_empty_dir(dir_fd: int, name: bytes) -> bool:
    fd = os.open(name, DIR_OPEN, dir_fd=dir_fd)
    try:
        return not os.listdir(fd)
    finally:
        os.close(fd)


def open_dir_at(dir_fd: int, name: bytes, rel: bytes, for_path: bytes | None = None) -> int:
    """Open directory `name` in `dir_fd` without following a symlink. A symlink or a
    non-directory there raises UnsafePath naming `rel` (and `for_path`, the path whose
    write needed it); a missing one raises FileNotFoundError."""
    try:
        return os.open(name, DIR_OPEN, dir_fd=dir_fd)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        st = lstat_at(dir_fd, name)
        what = "a symlink" if st is not None and stat.S_ISLNK(st.st_mode) else \
            "not a directory"
        if for_path is None:
            raise UnsafePath(f"refusing to go through {display(rel)!r}: it is {what}") from None
        raise UnsafePath(f"refusing to write {display(for_path)!r}: {display(rel)!r} is "
                         f"{what}") from None


class DirFds:
    """Fds of directories beneath `root_fd` (a small LRU cache; the root fd stays the
    caller's). With `create`, missing directories on the way are made (mode 0755: a
    restore whose manifest lacks a parent's own entry). Whoever renames or removes a
    directory must `forget` it."""

    def __init__(self, root_fd: int, *, create: bool = False) -> None:
        self.root_fd = root_fd
        self.create = create
        self._fds: OrderedDict[bytes, int] = OrderedDict()

    def get(self, rel: bytes, for_path: bytes | None = None) -> int:
        """The fd of directory `rel` (b"" = the root). It belongs to the cache and stays
        valid until the next `get` or `remember`: dup it to hold on to it.

        FileNotFoundError if it is missing (without `create`); UnsafePath if a component
        is a symlink or not a directory."""
        if not rel:
            return self.root_fd
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
            return fd
        # Start from the deepest cached ancestor: a tree is written in path order, so
        # that is almost always the parent.
        parts = rel.split(b"/")
        i = len(parts) - 1
        while i > 0 and (fd := self._fds.get(b"/".join(parts[:i]))) is None:
            i -= 1
        if fd is None:
            fd = self.root_fd
        for j in range(i, len(parts)):
            sub = b"/".join(parts[: j + 1])
            fd = self._open(fd, parts[j], sub, for_path)
            self.remember(sub, fd)
        return fd

    def cached(self, rel: bytes) -> int | None:
        return self._fds.get(rel)

    def remember(self, rel: bytes, fd: int) -> None:
        """Hand the fd of directory `rel` to the cache (which then closes it)."""
        old = self._fds.pop(rel, None)
        if old is not None and old != fd:
            os.close(old)
        self._fds[rel] = fd
        if len(self._fds) > _CACHE_SIZE:
            os.close(self._fds.popitem(last=False)[1])

    def forget(self, rel: bytes) -> None:
        """Drop `rel` and everything beneath it (renamed or removed)."""
        prefix = rel + b"/"
        for key in [k for k in self._fds if k == rel or k.startswith(prefix)]:
            os.close(self._fds.pop(key))

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def _open(self, pfd: int, name: bytes, rel: bytes, for_path: bytes | None) -> int:
        try:
            return open_dir_at(pfd, name, rel, for_path)
        except FileNotFoundError:
            if not self.create:
                raise
        try:
            os.mkdir(name, 0o755, dir_fd=pfd)
        except FileExistsError:
            pass
        return open_dir_at(pfd, name, rel, for_path)

"""One call's hold on an apply: the work directory locked, fds of the tree's root, of
stage/ and backup/, and of the tree's directories (reached with O_NOFOLLOW)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from strata.errors import StrataError
from strata.layers.apply.format import BACKUP, STAGE
from strata.tree.dirfd import DIR_OPEN, DirFds
from strata.tree.scan import display


class Session:
    def __init__(self, root: bytes, work: bytes, root_fd: int, work_fd: int) -> None:
        self.root, self.work = root, work
        self.root_fd = root_fd
        self.work_fd = work_fd
        self.dirs = DirFds(root_fd)
        self.stage_fd = -1
        self.backup_fd = -1
        self.known_dirs: set[bytes] = set()  # staging: directories checked on disk

    def open_work_dirs(self, create: bool) -> None:
        fds = []
        for name in (STAGE, BACKUP):
            if create:
                os.mkdir(name, 0o700, dir_fd=self.work_fd)
            try:
                fds.append(os.open(name, DIR_OPEN, dir_fd=self.work_fd))
            except FileNotFoundError:
                for fd in fds:
                    os.close(fd)
                raise StrataError(f"the apply journal's {name}/ directory is missing: the "
                                  "apply cannot be finished or rolled back") from None
        self.stage_fd, self.backup_fd = fds

    def close_work_dirs(self) -> None:
        for fd in (self.stage_fd, self.backup_fd):
            if fd >= 0:
                os.close(fd)
        self.stage_fd = self.backup_fd = -1

    def close(self) -> None:
        self.dirs.close()
        self.close_work_dirs()
        for fd in (self.root_fd, self.work_fd):
            if fd >= 0:
                os.close(fd)  # closing work_fd releases the lock


def lock_work_dir(work: bytes, root: bytes) -> int:
    """An fd of `work` (created if missing) holding its exclusive lock."""
    while True:
        os.makedirs(work, mode=0o700, exist_ok=True)
        fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StrataError(f"another apply is running on {display(root)}") from None
        if os.fstat(fd).st_nlink > 0:
            return fd
        # A finished apply removed the directory between our open and our lock: this fd
        # names a deleted directory, in which nothing can be created. Start again.
        os.close(fd)


@contextmanager
def session(root: bytes, work: bytes) -> Iterator[Session]:
    work_fd = lock_work_dir(work, root)
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except BaseException:
        os.close(work_fd)
        raise
    s = Session(root, work, root_fd, work_fd)
    try:
        yield s
    finally:
        s.close()

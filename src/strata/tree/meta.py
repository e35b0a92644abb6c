"""Metadata of one node (owner, xattrs, mode, times), applied in the one order that keeps
setuid bits and file capabilities, and what a safe restore withholds.

Order: chown first (the kernel clears setuid/setgid bits and security.capability on a
chown), then xattrs, then chmod, then times (every other change moves ctime, and a
directory's mtime moves whenever something is created in it: directories get their mode
and times last, deepest first, from the caller).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace

from strata.model.entry import Entry, EntryType
from strata.tree.xattrs import HAVE_PROC, PRIVILEGED, Warn, node_path, sync_xattrs

_SETID = stat.S_ISUID | stat.S_ISGID
CAPABILITY = b"security.capability"


@dataclass(frozen=True, slots=True)
class Meta:
    """What is applied to a node besides its content."""

    mode: int  # permission bits (with setuid/setgid/sticky), no file-type bits
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    xattrs: dict[bytes, bytes] = field(default_factory=dict)

    @classmethod
    def of_entry(cls, e: Entry) -> Meta:
        # Entries keep no atime: the mtime stands in (what tar and rsync do too).
        return cls(e.mode & 0o7777, e.uid, e.gid, e.mtime_ns, e.mtime_ns, dict(e.xattrs))

    @classmethod
    def of_stat(cls, st: os.stat_result, xattrs: dict[bytes, bytes]) -> Meta:
        return cls(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_atime_ns,
                   st.st_mtime_ns, xattrs)


class Node:
    """Where metadata goes: an open fd of the node (files, directories), or a name in a
    held directory fd (symlinks, FIFOs and device nodes, which must not be opened, and
    nodes changed in place). Neither follows a symlink."""

    def __init__(self, *, fd: int = -1, dir_fd: int = -1, name: bytes = b"",
                 symlink: bool = False, is_dir: bool = False) -> None:
        self.fd, self.dir_fd, self.name = fd, dir_fd, name
        self.symlink, self.is_dir = symlink, is_dir

    @classmethod
    def of_fd(cls, fd: int, *, is_dir: bool = False) -> Node:
        return cls(fd=fd, is_dir=is_dir)

    @classmethod
    def at(cls, dir_fd: int, name: bytes, st_mode: int) -> Node:
        return cls(dir_fd=dir_fd, name=name, symlink=stat.S_ISLNK(st_mode),
                   is_dir=stat.S_ISDIR(st_mode))

    def chown(self, uid: int, gid: int) -> None:
        if self.fd >= 0:
            os.fchown(self.fd, uid, gid)
        else:
            os.chown(self.name, uid, gid, dir_fd=self.dir_fd, follow_symlinks=False)

    def xattr_target(self) -> int | bytes | None:
        """What the xattr calls take; None when a name cannot be reached safely."""
        if self.fd >= 0:
            return self.fd
        return node_path(self.dir_fd, self.name) if HAVE_PROC else None

    def chmod(self, mode: int) -> None:
        if self.symlink:
            return  # a symlink's mode means nothing on Linux, and cannot be set
        if self.fd >= 0:
            os.fchmod(self.fd, mode)
            return
        if not HAVE_PROC:
            # No fchmodat(AT_SYMLINK_NOFOLLOW) in Python: the caller just made this node.
            os.chmod(self.name, mode, dir_fd=self.dir_fd)
            return
        # An O_PATH fd pins the node itself; chmod through its /proc link cannot be
        # redirected by a symlink swapped in after the lstat that chose this node.
        fd = os.open(self.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        try:
            if not stat.S_ISLNK(os.fstat(fd).st_mode):
                os.chmod(b"/proc/self/fd/%d" % fd, mode)
        finally:
            os.close(fd)

    def utime(self, atime_ns: int, mtime_ns: int) -> None:
        if self.fd >= 0:
            os.utime(self.fd, ns=(atime_ns, mtime_ns))
        else:  # lutimes for a symlink: its own times, never its target's
            os.utime(self.name, ns=(atime_ns, mtime_ns), dir_fd=self.dir_fd,
                     follow_symlinks=False)


def apply_meta(node: Node, meta: Meta, *, owner: bool, warn: Warn,
               stale: Collection[bytes] = (), current: Mapping[bytes, bytes] | None = None
               ) -> None:
    """Owner, xattrs, then (except for a directory: see `set_dir_meta`) mode and times.

    `stale`: xattrs on the node to remove unless `meta` has them; `current`: the xattrs
    the node has now, when known. A failed chown or xattr or utime is passed to `warn`
    (no privilege, no filesystem support); a failed chmod raises."""
    if owner:
        try:
            node.chown(meta.uid, meta.gid)
        except OSError as e:
            warn("could not set owner", e)
    if meta.xattrs or stale:
        target = node.xattr_target()
        if target is None:
            warn("xattrs skipped", OSError(0, "/proc is not mounted"))
        else:
            sync_xattrs(target, meta.xattrs, symlink=node.symlink, stale=stale,
                        current=current, warn=warn)
    if node.is_dir:
        return
    node.chmod(meta.mode)
    try:
        node.utime(meta.atime_ns, meta.mtime_ns)
    except OSError as e:
        warn("could not set mtime", e)


def set_dir_meta(fd: int, atime_ns: int, mtime_ns: int, mode: int | None) -> None:
    """A directory's mode (unless None) and times: last, once nothing moves in any more."""
    if mode is not None:
        os.fchmod(fd, mode)
    os.utime(fd, ns=(atime_ns, mtime_ns))


def withhold_privileges(e: Entry) -> tuple[Entry, list[str], list[bytes]]:
    """`e` without what would grant privileges in a tree restored for browsing: setuid and
    setgid bits (a setgid directory only passes its group on: it stays), and security.*
    and trusted.* xattrs (file capabilities, SMACK exec labels, overlayfs redirects; an
    SELinux label is the target policy's to give). Device nodes are the caller's to
    refuse. Returns the entry, what was left out that grants privileges (setuid/setgid
    bits, file capabilities), and the names of the other xattrs left out."""
    notable: list[str] = []
    mode = e.mode
    if e.type is not EntryType.DIR and mode & _SETID:
        mode &= ~_SETID
        notable.append("setuid/setgid bits")
    dropped = [k for k in e.xattrs if k.startswith(PRIVILEGED)]
    if not notable and not dropped:
        return e, notable, dropped
    if CAPABILITY in dropped:
        dropped.remove(CAPABILITY)
        notable.append("file capabilities")
    xattrs = {k: v for k, v in e.xattrs.items() if not k.startswith(PRIVILEGED)}
    return replace(e, mode=mode, xattrs=xattrs), notable, dropped

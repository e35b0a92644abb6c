"""Materialize Entries under a target directory, never writing outside it.

Every path is validated, and every parent directory is reached with openat(O_NOFOLLOW)
from a held fd of the target, so neither '..' nor a symlink (restored earlier from the
same manifest or already present in the target) can redirect a write.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TypeVar

from strata.errors import StrataError, UnsafePath
from strata.model.entry import Entry, EntryType
from strata.tree.order import path_key
from strata.tree.scan import display

_T = TypeVar("_T")
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FD_CACHE_SIZE = 64
_PATH_MAX = 4096
_ACL_ACCESS = b"system.posix_acl_access"
_ACL_DEFAULT = b"system.posix_acl_default"
# Namespaces a restore owns on a pre-existing directory: extra attributes get removed.
# security.* is left alone (e.g. an SELinux label the system assigned).
_SYNCED_XATTRS = (b"user.", b"trusted.", b"system.posix_acl_")
# The kernel refuses user.* (and ACLs) on symlinks; only these can be set there.
_SYMLINK_XATTRS = (b"trusted.", b"security.")


def validate_path(p: bytes) -> None:
    """Raise UnsafePath unless `p` is a relative, normalized path that stays beneath a root."""
    if not isinstance(p, bytes):
        raise UnsafePath(f"unsafe path {p!r}: not bytes")
    if not p:
        raise UnsafePath("unsafe path b'': empty")
    if b"\0" in p:
        raise UnsafePath(f"unsafe path {display(p)!r}: contains a NUL byte")
    if p.startswith(b"/"):
        raise UnsafePath(f"unsafe path {display(p)!r}: absolute")
    for comp in p.split(b"/"):
        if comp in (b"", b".", b".."):
            what = "empty" if not comp else repr(comp.decode())
            raise UnsafePath(f"unsafe path {display(p)!r}: {what} component")


class TreeWriter:
    """Writes entries (parents before children, as in path_key order) beneath `target`.

    Non-fatal problems (unsupported xattrs, chown without privilege, device nodes when not
    root, hardlinks to a name that was not restored) are appended to `warnings`.
    Directory modes and mtimes are applied by `finish()` (called by `__exit__`).
    """

    def __init__(
        self, target: str | bytes | os.PathLike, *, restore_owner: bool | None = None
    ) -> None:
        self.target = os.path.abspath(os.fsencode(target))
        self.restore_owner = os.geteuid() == 0 if restore_owner is None else restore_owner
        self.warnings: list[str] = []
        self._is_root = os.geteuid() == 0
        self._proc = os.path.isdir(b"/proc/self/fd")
        os.makedirs(self.target, exist_ok=True)
        self._root_fd = os.open(self.target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fds: OrderedDict[bytes, int] = OrderedDict()
        self._dirs: dict[bytes, tuple[int, int]] = {}  # deferred: path -> (mode, mtime_ns)
        # Directories with a default ACL: what is created in them inherits ACLs, which
        # must be removed again when the entry has none.
        self._acl_dirs: set[bytes] = set()
        try:
            os.getxattr(self._root_fd, _ACL_DEFAULT)
            self._acl_dirs.add(b"")
        except OSError:
            pass

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> TreeWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.finish()
        finally:
            self.close()

    def close(self) -> None:
        """Release all directory fds (does not apply deferred directory metadata)."""
        while self._fds:
            os.close(self._fds.popitem()[1])
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def finish(self) -> None:
        """Apply deferred directory modes and mtimes, deepest first."""
        for rel in sorted(self._dirs, key=path_key, reverse=True):
            mode, mtime_ns = self._dirs[rel]
            fd = self._fds.get(rel)
            owned = fd is None
            if fd is None:
                parent, _, name = rel.rpartition(b"/")
                pfd = self._dir_fd(parent, rel)
                try:
                    fd = os.open(name, _DIR_OPEN, dir_fd=pfd)
                except OSError as e:
                    self._warn(rel, "directory vanished before its metadata was set", e)
                    continue
            try:
                os.fchmod(fd, mode)
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            except OSError as e:
                self._warn(rel, "could not set mode/mtime", e)
            finally:
                if owned:
                    os.close(fd)
        self._dirs.clear()

    # -- writing -------------------------------------------------------------------------

    def write(self, entry: Entry, data: Iterable[bytes] | None = None) -> None:
        """Create `entry` beneath the target (replacing whatever is there) with its metadata.

        `data` supplies a FILE's content chunks in order; it is ignored for other types.
        """
        path = entry.path
        validate_path(path)
        parent, _, name = path.rpartition(b"/")
        pfd = self._dir_fd(parent, path)
        etype = entry.type
        inherited = parent in self._acl_dirs
        if etype is EntryType.DIR:
            self._write_dir(pfd, name, entry, inherited)
        elif etype is EntryType.FILE:
            self._write_file(pfd, name, entry, data, inherited)
        elif etype is EntryType.SYMLINK:
            target = entry.link_target
            self._create(lambda: os.symlink(target, name, dir_fd=pfd), pfd, name, path)
            self._meta_by_name(pfd, name, entry, False)
        elif etype is EntryType.HARDLINK:
            self._write_hardlink(name, entry)
        elif etype is EntryType.FIFO:
            self._create(lambda: os.mkfifo(name, 0o600, dir_fd=pfd), pfd, name, path)
            self._meta_by_name(pfd, name, entry, inherited)
        elif etype is EntryType.CHARDEV or etype is EntryType.BLOCKDEV:
            if not self._is_root:
                self.warnings.append(f"{display(path)}: device node skipped (needs root)")
                return
            fmt = stat.S_IFCHR if etype is EntryType.CHARDEV else stat.S_IFBLK
            try:
                self._create(
                    lambda: os.mknod(name, fmt | 0o600, entry.rdev, dir_fd=pfd), pfd, name, path
                )
            except PermissionError as e:  # root without CAP_MKNOD, e.g. in a container
                self._warn(path, "device node skipped", e)
                return
            self._meta_by_name(pfd, name, entry, inherited)
        else:
            raise StrataError(f"{display(path)}: unknown entry type {etype!r}")

    def _write_dir(self, pfd: int, name: bytes, entry: Entry, inherited: bool) -> None:
        path = entry.path
        fd = self._fds.get(path)
        existed = fd is not None
        if fd is None:
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
            except FileExistsError:
                try:
                    fd = os.open(name, _DIR_OPEN, dir_fd=pfd)
                    existed = True
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    # A file or symlink is in the way: the symlink itself goes, unfollowed.
                    os.unlink(name, dir_fd=pfd)
                    os.mkdir(name, 0o700, dir_fd=pfd)
            if fd is None:
                fd = os.open(name, _DIR_OPEN, dir_fd=pfd)
            self._remember(path, fd)
        if existed:
            try:
                names = os.listxattr(fd)
            except OSError:
                names = []
            stale = {k for k in map(os.fsencode, names) if k.startswith(_SYNCED_XATTRS)}
        elif inherited:
            stale = {_ACL_ACCESS, _ACL_DEFAULT}
        else:
            stale = set()
        self._chown(path, lambda: os.fchown(fd, entry.uid, entry.gid))
        self._set_xattrs(fd, entry, stale, False)
        if _ACL_DEFAULT in entry.xattrs:
            self._acl_dirs.add(path)
        else:
            self._acl_dirs.discard(path)
        self._dirs[path] = (entry.mode & 0o7777, entry.mtime_ns)

    def _write_file(
        self, pfd: int, name: bytes, entry: Entry, data: Iterable[bytes] | None, inherited: bool
    ) -> None:
        fd = self._create(
            lambda: os.open(name, _FILE_CREATE, 0o600, dir_fd=pfd), pfd, name, entry.path
        )
        try:
            if data is not None:
                sparse = entry.sparse
                for chunk in data:
                    n = len(chunk)
                    if sparse and chunk.count(0) == n:
                        os.lseek(fd, n, os.SEEK_CUR)
                        continue
                    written = os.write(fd, chunk)
                    if written < n:
                        view = memoryview(chunk)[written:]
                        while view:
                            view = view[os.write(fd, view):]
            if entry.sparse:
                os.ftruncate(fd, entry.size)  # also materializes a trailing hole
            # chown first: it clears setuid/setgid bits and security.capability, which the
            # later xattr and chmod calls then restore.
            self._chown(entry.path, lambda: os.fchown(fd, entry.uid, entry.gid))
            self._set_xattrs(fd, entry, {_ACL_ACCESS} if inherited else set(), False)
            os.fchmod(fd, entry.mode & 0o7777)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        finally:
            os.close(fd)

    def _write_hardlink(self, name: bytes, entry: Entry) -> None:
        path, first = entry.path, entry.link_target
        try:
            validate_path(first)
        except UnsafePath as e:
            raise UnsafePath(f"hardlink {display(path)!r} -> {e}") from None
        src_parent, _, src_name = first.rpartition(b"/")
        # dup: resolving the destination parent may evict the source fd from the cache.
        src_fd = os.dup(self._dir_fd(src_parent, path))
        try:
            pfd = self._dir_fd(path.rpartition(b"/")[0], path)
            try:
                self._create(
                    lambda: os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=pfd,
                                    follow_symlinks=False),
                    pfd, name, path,
                )
            except OSError as e:  # first name missing (partial restore), EXDEV, EMLINK
                self._warn(path, f"cannot hardlink to {display(first)!r}", e)
        finally:
            os.close(src_fd)
        # The inode already carries its metadata from the first name.

    # -- helpers -------------------------------------------------------------------------

    def _create(self, make: Callable[[], _T], pfd: int, name: bytes, rel: bytes) -> _T:
        # Try first, clear on EEXIST: a fresh restore pays no extra unlink per path.
        try:
            return make()
        except FileExistsError:
            self._clear(pfd, name, rel)
            return make()

    def _clear(self, pfd: int, name: bytes, rel: bytes) -> None:
        """Remove whatever is at `name` (a symlink itself, never its target)."""
        try:
            os.unlink(name, dir_fd=pfd)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno not in (errno.EISDIR, errno.EPERM):
                raise
            if not stat.S_ISDIR(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode):
                raise
        # shutil's fd-based rmtree never follows symlinks; it wants a str name with dir_fd.
        shutil.rmtree(os.fsdecode(name), dir_fd=pfd)
        prefix = rel + b"/"
        for key in [k for k in self._fds if k == rel or k.startswith(prefix)]:
            os.close(self._fds.pop(key))
        for key in [k for k in self._dirs if k == rel or k.startswith(prefix)]:
            del self._dirs[key]
        self._acl_dirs = {k for k in self._acl_dirs if k != rel and not k.startswith(prefix)}

    def _remember(self, rel: bytes, fd: int) -> None:
        old = self._fds.pop(rel, None)
        if old is not None and old != fd:
            os.close(old)
        self._fds[rel] = fd
        if len(self._fds) > _FD_CACHE_SIZE:
            os.close(self._fds.popitem(last=False)[1])

    def _dir_fd(self, rel: bytes, for_path: bytes) -> int:
        """An fd of directory `rel` reached without following symlinks; missing ones are made.

        The fd belongs to the cache: use it before the next `_dir_fd` call, or dup it.
        """
        if not rel:
            return self._root_fd
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
            return fd
        parts = rel.split(b"/")
        i = len(parts) - 1
        fd = None
        while i > 0:
            fd = self._fds.get(b"/".join(parts[:i]))
            if fd is not None:
                break
            i -= 1
        if fd is None:
            fd = self._root_fd
        for j in range(i, len(parts)):
            sub = b"/".join(parts[: j + 1])
            fd = self._open_dir(fd, parts[j], sub, for_path)
            self._remember(sub, fd)
        return fd

    def _open_dir(self, pfd: int, name: bytes, rel: bytes, for_path: bytes) -> int:
        try:
            try:
                return os.open(name, _DIR_OPEN, dir_fd=pfd)
            except FileNotFoundError:
                # No entry for this parent came first (e.g. a partial restore): make it.
                try:
                    os.mkdir(name, 0o755, dir_fd=pfd)
                except FileExistsError:
                    pass
                return os.open(name, _DIR_OPEN, dir_fd=pfd)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            try:
                is_link = stat.S_ISLNK(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode)
            except OSError:
                is_link = False
            what = "a symlink" if is_link else "not a directory"
            raise UnsafePath(
                f"refusing to write {display(for_path)!r}: {display(rel)!r} in the target is"
                f" {what}"
            ) from None

    def _name_path(self, pfd: int, name: bytes, rel: bytes) -> bytes | None:
        """A path for calls lacking dir_fd support (xattrs), resolving through `pfd`."""
        if self._proc:
            return b"/proc/self/fd/%d/%s" % (pfd, name)
        full = self.target + b"/" + rel
        return full if len(full) < _PATH_MAX else None

    def _meta_by_name(self, pfd: int, name: bytes, entry: Entry, inherited: bool) -> None:
        """Metadata for a symlink, FIFO or device node (which must not be opened)."""
        path = entry.path
        is_link = entry.type is EntryType.SYMLINK
        self._chown(path, lambda: os.chown(name, entry.uid, entry.gid, dir_fd=pfd,
                                           follow_symlinks=False))
        if entry.xattrs or inherited:
            xpath = self._name_path(pfd, name, path)
            if xpath is None:
                self.warnings.append(f"{display(path)}: xattrs skipped (path too long)")
            else:
                stale = {_ACL_ACCESS} if inherited and not is_link else set()
                self._set_xattrs(xpath, entry, stale, is_link)
        if not is_link:
            self._chmod_special(pfd, name, entry)
        try:
            os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=pfd,
                     follow_symlinks=False)
        except OSError as e:
            self._warn(path, "could not set mtime", e)

    def _chmod_special(self, pfd: int, name: bytes, entry: Entry) -> None:
        mode = entry.mode & 0o7777
        if not self._proc:
            # No fchmodat(AT_SYMLINK_NOFOLLOW) in Python: we just created this node.
            os.chmod(name, mode, dir_fd=pfd)
            return
        # An O_PATH fd pins the node itself; chmod through its /proc link cannot be
        # redirected by a symlink swapped in after creation.
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            if not stat.S_ISLNK(os.fstat(fd).st_mode):
                os.chmod(b"/proc/self/fd/%d" % fd, mode)
        finally:
            os.close(fd)

    def _chown(self, path: bytes, do: Callable[[], None]) -> None:
        if not self.restore_owner:
            return
        try:
            do()
        except OSError as e:
            self._warn(path, "could not set owner", e)

    def _set_xattrs(
        self, target: int | bytes, entry: Entry, stale: set[bytes], symlink: bool
    ) -> None:
        xattrs = entry.xattrs
        # Paths name the node itself (never a symlink's target); fds forbid the flag.
        nofollow = isinstance(target, bytes)
        for key in stale:
            if key not in xattrs:
                try:
                    os.removexattr(target, key, follow_symlinks=not nofollow)
                except OSError as e:
                    if e.errno != errno.ENODATA:
                        self._warn(entry.path, f"could not remove xattr {display(key)}", e)
        for key, value in xattrs.items():
            if symlink and not key.startswith(_SYMLINK_XATTRS):
                continue
            try:
                os.setxattr(target, key, value, follow_symlinks=not nofollow)
            except OSError as e:
                self._warn(entry.path, f"could not set xattr {display(key)}", e)

    def _warn(self, path: bytes, what: str, exc: OSError) -> None:
        self.warnings.append(f"{display(path)}: {what}: {exc.strerror or exc}")

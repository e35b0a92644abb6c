"""Materialize Entries under a target directory, never writing outside it.

Every path is validated, and every parent directory is reached with openat(O_NOFOLLOW)
from a held fd of the target (`tree.dirfd`), so neither '..' nor a symlink (restored
earlier from the same manifest or already present in the target) can redirect a write.
Metadata goes on in the order `tree.meta` explains; a safe restore (the default of
`strata store restore` and `agent restore --to`) withholds what grants privileges.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections import Counter
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TypeVar

from strata.errors import CorruptData, StrataError, UnsafePath
from strata.model.entry import Entry, EntryType
from strata.tree.content import write_chunks
from strata.tree.dirfd import DIR_OPEN, DirFds, split
from strata.tree.meta import Meta, Node, apply_meta, set_dir_meta, withhold_privileges
from strata.tree.order import path_key
from strata.tree.scan import display
from strata.tree.xattrs import ACL_ACCESS, ACL_DEFAULT, PRIVILEGED, SYNCED

_T = TypeVar("_T")
_FILE_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


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

    `full_metadata=False` makes a safe restore: no device nodes, no setuid/setgid bits, no
    security.* or trusted.* xattrs (file capabilities among them). What grants privileges
    and was left out is listed in `withheld`; other left-out xattrs are counted in
    `withheld_xattrs`. `durable` fsyncs every file written (the apply journal's staging).
    """

    def __init__(
        self, target: str | bytes | os.PathLike, *, restore_owner: bool | None = None,
        full_metadata: bool = True, durable: bool = False,
    ) -> None:
        self.target = os.path.abspath(os.fsencode(target))
        self.restore_owner = os.geteuid() == 0 if restore_owner is None else restore_owner
        self.full_metadata = full_metadata
        self.durable = durable
        self.warnings: list[str] = []
        self.withheld: list[str] = []
        self.withheld_xattrs: Counter[bytes] = Counter()
        self._is_root = os.geteuid() == 0
        os.makedirs(self.target, exist_ok=True)
        self._root_fd = os.open(self.target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fds = DirFds(self._root_fd, create=True)
        self._dirs: dict[bytes, tuple[int, int]] = {}  # deferred: path -> (mode, mtime_ns)
        # A restore owns these namespaces on a directory that already exists: what the
        # entry lacks goes. A safe restore leaves the privileged ones alone entirely.
        self._synced = SYNCED if full_metadata else tuple(
            ns for ns in SYNCED if not ns.startswith(PRIVILEGED))
        # Directories with a default ACL: what is created in them inherits ACLs, which
        # must be removed again when the entry has none.
        self._acl_dirs: set[bytes] = set()
        try:
            os.getxattr(self._root_fd, ACL_DEFAULT)
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
        self._fds.close()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def finish(self) -> None:
        """Apply deferred directory modes and mtimes, deepest first."""
        for rel in sorted(self._dirs, key=path_key, reverse=True):
            mode, mtime_ns = self._dirs[rel]
            fd = self._fds.cached(rel)
            owned = fd is None
            if fd is None:
                parent, name = split(rel)
                pfd = self._fds.get(parent, rel)
                try:
                    fd = os.open(name, DIR_OPEN, dir_fd=pfd)
                except OSError as e:
                    self._warn(rel, "directory vanished before its metadata was set", e)
                    continue
            try:
                set_dir_meta(fd, mtime_ns, mtime_ns, mode)
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
        Raises UnsafePath for a path that would leave the target, CorruptData when `data`
        does not add up to the entry's size (the file is then removed again)."""
        path = entry.path
        validate_path(path)
        etype = entry.type
        if not self.full_metadata and etype is not EntryType.HARDLINK:  # its inode's is set
            if etype is EntryType.CHARDEV or etype is EntryType.BLOCKDEV:
                self.withheld.append(f"{display(path)}: device node not created")
                return
            entry, notable, dropped = withhold_privileges(entry)
            if notable:
                self.withheld.append(f"{display(path)}: {' and '.join(notable)} left out")
            self.withheld_xattrs.update(dropped)
        parent, name = split(path)
        pfd = self._fds.get(parent, path)
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
        fd = self._fds.cached(path)
        existed = fd is not None
        if fd is None:
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
            except FileExistsError:
                try:
                    fd = os.open(name, DIR_OPEN, dir_fd=pfd)
                    existed = True
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    # A file or symlink is in the way: the symlink itself goes, unfollowed.
                    os.unlink(name, dir_fd=pfd)
                    os.mkdir(name, 0o700, dir_fd=pfd)
            if fd is None:
                fd = os.open(name, DIR_OPEN, dir_fd=pfd)
            self._fds.remember(path, fd)
        if existed:
            try:
                names = os.listxattr(fd)
            except OSError:
                names = []
            stale = {k for k in map(os.fsencode, names) if k.startswith(self._synced)}
        elif inherited:
            stale = {ACL_ACCESS, ACL_DEFAULT}
        else:
            stale = set()
        apply_meta(Node.of_fd(fd, is_dir=True), Meta.of_entry(entry), owner=self.restore_owner,
                   stale=stale, warn=self._warner(path))
        if ACL_DEFAULT in entry.xattrs:
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
                got = write_chunks(fd, data, sparse=entry.sparse)
                if got != entry.size:
                    raise CorruptData(f"the data delivered {got} bytes, the entry says "
                                      f"{entry.size}")
            if entry.sparse:
                os.ftruncate(fd, entry.size)  # also materializes a trailing hole
            apply_meta(Node.of_fd(fd), Meta.of_entry(entry), owner=self.restore_owner,
                       stale={ACL_ACCESS} if inherited else set(), warn=self._warner(entry.path))
            if self.durable:
                os.fsync(fd)  # last: the metadata goes to disk with the data
        except BaseException:
            # A half-written file must not pass for the real one: it goes (it is ours,
            # made with O_EXCL just now).
            try:
                os.unlink(name, dir_fd=pfd)
            except OSError:
                pass
            raise
        finally:
            os.close(fd)

    def _write_hardlink(self, name: bytes, entry: Entry) -> None:
        path, first = entry.path, entry.link_target
        try:
            validate_path(first)
        except UnsafePath as e:
            raise UnsafePath(f"hardlink {display(path)!r} -> {e}") from None
        src_parent, src_name = split(first)
        # dup: resolving the destination parent may evict the source fd from the cache.
        src_fd = os.dup(self._fds.get(src_parent, path))
        try:
            pfd = self._fds.get(split(path)[0], path)
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
        self._fds.forget(rel)
        for key in [k for k in self._dirs if k == rel or k.startswith(prefix)]:
            del self._dirs[key]
        self._acl_dirs = {k for k in self._acl_dirs if k != rel and not k.startswith(prefix)}

    def _meta_by_name(self, pfd: int, name: bytes, entry: Entry, inherited: bool) -> None:
        """Metadata for a symlink, FIFO or device node (which must not be opened)."""
        is_link = entry.type is EntryType.SYMLINK
        node = Node(dir_fd=pfd, name=name, symlink=is_link)
        apply_meta(node, Meta.of_entry(entry), owner=self.restore_owner,
                   stale={ACL_ACCESS} if inherited and not is_link else set(),
                   warn=self._warner(entry.path))

    def _warner(self, path: bytes) -> Callable[[str, OSError], None]:
        return lambda what, exc: self._warn(path, what, exc)

    def _warn(self, path: bytes, what: str, exc: OSError) -> None:
        self.warnings.append(f"{display(path)}: {what}: {exc.strerror or exc}")

"""The FUSE filesystem of one snapshot, read-only, served in the foreground until it is
unmounted (`umount`, `fusermount3 -u`) or the process is interrupted (Ctrl-C, SIGTERM).

Everything it answers comes from a `SnapshotTree`; this module only translates: inodes
and attributes for the kernel, errors as errno values. Snapshots never change, so the
kernel may cache names, attributes and pages for as long as it likes.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
import sys
from collections.abc import Callable, Sequence

import pyfuse3
import trio

from strata.engine.snapshot_tree import ROOT_INODE, SnapshotTree
from strata.errors import StrataError
from strata.model.entry import EntryType
from strata.tree.scan import display

CACHE_SECONDS = 3600.0  # nothing in a snapshot ever changes
BLOCK = 128 << 10  # what the kernel reads at a time; also the st_blksize that cp uses
FUSE_DEVICE = "/dev/fuse"


class MountError(StrataError):
    """The mount cannot start (no FUSE, a bad mountpoint); nothing was mounted."""


def check_fuse(device: str = FUSE_DEVICE) -> None:
    if not os.path.exists(device):
        raise MountError(f"FUSE is not available: {device} is missing (load the kernel "
                         "module with `modprobe fuse`; in a container, pass the device in)")
    try:
        os.close(os.open(device, os.O_RDWR))
    except OSError as exc:
        raise MountError(f"cannot use {device}: {exc.strerror}") from None


def check_mountpoint(path: str) -> str:
    """The mountpoint as an absolute path: an existing, empty folder not mounted on."""
    full = os.path.abspath(path)
    try:
        os.listdir(full)  # not stat: the kernel may answer that from its cache
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:  # a FUSE mount whose process died
            raise MountError(f"{path} is a dead mount (the process serving it is gone): "
                             f"run `fusermount3 -u {path}` first") from None
    if not os.path.isdir(full):
        raise MountError(f"mountpoint {path} is not a folder" if os.path.exists(full)
                         else f"mountpoint {path} does not exist")
    if os.path.ismount(full):
        raise MountError(f"something is already mounted on {path}")
    try:
        if os.listdir(full):
            raise MountError(f"mountpoint {path} is not empty")
    except PermissionError:
        raise MountError(f"cannot read mountpoint {path}: permission denied") from None
    return full


class SnapshotFS(pyfuse3.Operations):
    """The kernel's questions, answered from `tree`."""

    def __init__(self, tree: SnapshotTree, warn: Callable[[str], None]) -> None:
        super().__init__()
        self.tree = tree
        self._warn = warn
        self._handles = itertools.count(1)
        self._listings: dict[int, list[tuple[bytes, int]]] = {}

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        a = self.tree.attr(ino)
        out = pyfuse3.EntryAttributes()
        out.st_ino = ino
        out.generation = 0
        out.entry_timeout = CACHE_SECONDS
        out.attr_timeout = CACHE_SECONDS
        out.st_mode = a.st_mode
        out.st_nlink = a.nlink
        out.st_uid = a.uid
        out.st_gid = a.gid
        out.st_rdev = a.rdev
        out.st_size = a.size
        out.st_blksize = BLOCK
        out.st_blocks = (a.size + 511) // 512
        out.st_atime_ns = out.st_mtime_ns = out.st_ctime_ns = a.mtime_ns
        return out

    def _known(self, ino: int) -> int:
        if ino != ROOT_INODE and not 2 <= ino < len(self.tree) + 2:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return ino

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._attrs(self._known(parent_inode))
        ino = self.tree.lookup(self._known(parent_inode), name) if name != b".." else None
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(ino)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._known(inode))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if self.tree.attr(self._known(inode)).type is not EntryType.SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self.tree.readlink(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not self.tree.is_dir(self._known(inode)):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        # The listing is taken once per open: the kernel reads a large folder in several
        # calls, each resuming at an offset.
        fh = next(self._handles)
        self._listings[fh] = self.tree.listdir(inode)
        return fh

    async def releasedir(self, fh: int) -> None:
        self._listings.pop(fh, None)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        kids = self._listings.get(fh, [])
        for i in range(start_id, len(kids)):
            name, ino = kids[i]
            if not pyfuse3.readdir_reply(token, name, self._attrs(ino), i + 1):
                return

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if self.tree.attr(self._known(inode)).type is not EntryType.FILE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            # A read may wait for the store or the server: off the event loop, so the
            # kernel's other requests (a listing, another file) go on meanwhile.
            return await trio.to_thread.run_sync(self.tree.read, fh, off, size)
        except StrataError as exc:
            self._warn(f"cannot read {display(self.tree.entry(fh).path)}: {exc}")
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self.tree.entry(self._known(inode)).xattrs.get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return list(self.tree.entry(self._known(inode)).xattrs)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = BLOCK
        out.f_files = len(self.tree) + 1
        out.f_namemax = 255
        return out


def serve(tree: SnapshotTree, mountpoint: str, *, fsname: str = "strata",
          allow_other: bool = False, on_ready: Callable[[str], None] | None = None,
          warn: Callable[[str], None] | None = None) -> None:
    """Mount `tree` on `mountpoint` and answer the kernel until unmounted or signalled;
    unmounts on the way out. `on_ready` is called with the mountpoint once it is in use.
    `allow_other`: users other than the one mounting may read it too, as the snapshot's
    own modes and owners allow (for a user other than root, /etc/fuse.conf must say
    user_allow_other)."""
    check_fuse()
    where = check_mountpoint(mountpoint)
    options = set(pyfuse3.default_options) | {
        f"fsname={fsname.replace(',', '_')}", "subtype=strata", "ro", "nodev", "nosuid"}
    if allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(SnapshotFS(tree, warn or _stderr), where, options)
    except RuntimeError as exc:
        raise MountError(f"cannot mount on {mountpoint}: {exc}") from None
    try:
        if on_ready:
            on_ready(where)
        trio.run(_main_until_signalled)
    finally:
        pyfuse3.close(unmount=True)


async def _main_until_signalled() -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
            async def stop_on_signal() -> None:
                async for _ in sigs:
                    nursery.cancel_scope.cancel()
                    return
            nursery.start_soon(stop_on_signal)
            await pyfuse3.main()  # returns once the filesystem is unmounted
            nursery.cancel_scope.cancel()


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)

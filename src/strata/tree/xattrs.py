"""Extended attributes: reading them, bringing a node's set to the one an entry records,
and which namespaces a restore owns, the kernel allows on symlinks, or grant privileges.

Python has no *xattrat() calls: a node that must not be opened (a symlink, FIFO or
device node, or one changed in place) is named through its held directory fd as
/proc/self/fd/N/name, never by a path from the root that a symlink could redirect.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Collection, Mapping

ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
# Namespaces an entry owns on a node that already exists: attributes there that the entry
# lacks are removed. security.* stays (e.g. an SELinux label the system assigned).
SYNCED = (b"user.", b"trusted.", b"system.posix_acl_")
# The kernel refuses user.* (and ACLs) on symlinks; only these can be set there.
ON_SYMLINKS = (b"trusted.", b"security.")
# Attributes only a privileged process may set, some of which grant privileges
# (security.capability, SMACK64EXEC) or steer the kernel (trusted.overlay.*).
PRIVILEGED = (b"security.", b"trusted.")
# Missing xattr support, unreadable namespaces, or an attribute removed between list and get.
_QUIET = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES,
                    errno.ENODATA})
HAVE_PROC = os.path.isdir(b"/proc/self/fd")

# Called with what failed ("could not set xattr user.x") and the error.
Warn = Callable[[str, OSError], None]


def node_path(dir_fd: int, name: bytes) -> bytes:
    """A path naming `name` in the held directory `dir_fd`, for calls without dir_fd."""
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


def read_xattrs(node: int | bytes) -> dict[bytes, bytes]:
    """All readable xattrs of `node`: an open fd, or a path to the node itself (a final
    symlink is never followed)."""
    follow = isinstance(node, int)  # fds forbid the flag; they name the node anyway
    try:
        names = os.listxattr(node, follow_symlinks=follow)
    except OSError as e:
        if e.errno in _QUIET:
            return {}
        raise
    out: dict[bytes, bytes] = {}
    for name in names:
        try:
            out[os.fsencode(name)] = os.getxattr(node, name, follow_symlinks=follow)
        except OSError as e:
            if e.errno not in _QUIET:
                raise
    return out


def sync_xattrs(node: int | bytes, want: Mapping[bytes, bytes], *, symlink: bool,
                stale: Collection[bytes] = (), current: Mapping[bytes, bytes] | None = None,
                warn: Warn) -> None:
    """Set every attribute of `want` on `node` (an fd, or a path from `node_path`) and
    remove those of `stale` that `want` lacks. `current`, when known, saves setting
    values that are already there. Failures are passed to `warn`, not raised: a target
    filesystem without xattr support must not stop a restore."""
    follow = isinstance(node, int)
    for key in stale:
        if key not in want:
            try:
                os.removexattr(node, key, follow_symlinks=follow)
            except OSError as e:
                if e.errno != errno.ENODATA:
                    warn(f"could not remove xattr {_show(key)}", e)
    for key, value in want.items():
        if symlink and not key.startswith(ON_SYMLINKS):
            continue
        if current is not None and current.get(key) == value:
            continue
        try:
            os.setxattr(node, key, value, follow_symlinks=follow)
        except OSError as e:
            warn(f"could not set xattr {_show(key)}", e)


def _show(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")

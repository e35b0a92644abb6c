"""Serving a snapshot as a read-only FUSE mount in the foreground, for `strata store
mount` and `strata endpoint mount`: what they print before and after, and the one-line
refusals (no FUSE, pyfuse3 not installed, a bad mountpoint)."""

from __future__ import annotations

from strata.engine.snapshot_tree import SnapshotTree
from strata.errors import StrataError

from .output import console, human_bytes

NO_PYFUSE3 = ("mounting needs pyfuse3 (pip install 'strata[mount]', with Debian's fuse3, "
              "libfuse3-dev and pkg-config)")
CACHE_SIZE_HELP = "Chunks kept in memory while mounted (e.g. 64MiB, 1GiB)."


def preflight(mountpoint: str) -> None:
    """The refusals that need nothing from the store or the server, made first: pyfuse3
    and /dev/fuse are there, the mountpoint is an empty folder."""
    try:
        from strata.mount.fuse import check_fuse, check_mountpoint
    except ImportError:
        raise StrataError(NO_PYFUSE3) from None
    check_fuse()
    check_mountpoint(mountpoint)


ALLOW_OTHER_HELP = ("Let other users read the mount too, as the snapshot's modes and "
                    "owners allow (by default only you can).")


def serve_mount(tree: SnapshotTree, mountpoint: str, label: str, fsname: str,
                allow_other: bool = False) -> None:
    """Mount `tree` until it is unmounted or interrupted, then say what was fetched."""
    try:
        from strata.mount.fuse import serve
    except ImportError:
        raise StrataError(NO_PYFUSE3) from None

    def ready(where: str) -> None:
        console.print(f"mounted {label} at {where} ({len(tree)} entries, read-only); "
                      f"Ctrl-C or `umount {where}` to stop", highlight=False, markup=False)
        console.file.flush()

    try:
        serve(tree, mountpoint, fsname=fsname, allow_other=allow_other, on_ready=ready)
    finally:
        tree.close()
    s = tree.cache.stats
    console.print(f"unmounted {mountpoint}: fetched {s.chunks_fetched} chunks "
                  f"({human_bytes(s.bytes_fetched)}) in {s.requests} "
                  f"request{'' if s.requests == 1 else 's'}, {s.cache_hits} cache hits",
                  highlight=False, markup=False)

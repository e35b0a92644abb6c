"""Has the endpoint's tree changed since its last snapshot?

A stat-only walk against the last manifest (no file is read), so that enforced compliance
can look at every check-in and take a snapshot only when something really changed.
"""

from __future__ import annotations

from pathlib import Path

from strata.model.entry import Entry, EntryType
from strata.model.manifest import decode_manifest
from strata.tree.excludes import ExcludeMatcher
from strata.tree.scan import scan_tree


def _same(now: Entry, then: Entry) -> bool:
    if now.path != then.path or now.type is not then.type:
        return False
    if now.type is EntryType.FILE:
        return now.same_stat(then)  # ctime moves on chmod, chown and xattr changes too
    if now.type in (EntryType.SYMLINK, EntryType.HARDLINK):
        return now.link_target == then.link_target
    return (now.mode, now.uid, now.gid, now.rdev) == (then.mode, then.uid, then.gid, then.rdev)


def tree_changed(root: Path, excludes: list[str], manifest: bytes | None, *,
                 one_file_system: bool = False) -> bool:
    """True if any path was added, removed or changed since `manifest` (the last snapshot,
    taken with the same `excludes`); True as well when there is no snapshot yet."""
    if manifest is None:
        return True
    before = decode_manifest([manifest])
    # Backup writes the manifest in scan order, so both sides walk in step.
    for now, _ in scan_tree(root, ExcludeMatcher(excludes), one_file_system=one_file_system):
        then = next(before, None)
        if then is None or not _same(now, then):
            return True
    return next(before, None) is not None

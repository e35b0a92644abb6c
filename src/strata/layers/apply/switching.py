"""The switch and its undo: operations carried out from the journal, each one or two
renames (or metadata set in place) whose state can be read off the disk, so that both
directions are idempotent and a crash inside either is recovered the same way."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from strata.errors import StrataError, UnsafePath
from strata.layers.apply.crashpoints import step
from strata.layers.apply.format import Journal, Op, OpAction, OpKind
from strata.layers.apply.session import Session
from strata.tree.dirfd import exists_at, is_empty_dir, lstat_at, split
from strata.tree.meta import Meta, Node, apply_meta, set_dir_meta
from strata.tree.order import path_key
from strata.tree.scan import display
from strata.tree.xattrs import SYNCED, node_path, read_xattrs

PUT, META, DELETE = OpKind.PUT, OpKind.META, OpKind.DELETE


@dataclass
class ApplyStats:
    """What a switch did. `bytes` counts the file content moved into the tree."""

    added: int = 0
    replaced: int = 0
    meta: int = 0
    deleted: int = 0
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)

    def count(self, op: Op) -> None:
        if op.action == OpAction.ADD:
            self.added += 1
        elif op.action == OpAction.REPLACE:
            self.replaced += 1
        elif op.action == OpAction.META:
            self.meta += 1
        elif op.action == OpAction.DELETE:
            self.deleted += 1
        if op.kind == PUT:
            self.bytes += op.size


def forward(s: Session, journal: Journal) -> ApplyStats:
    """Carry out every operation (again: what is done already is skipped). Deletes run
    children first, then puts and metas parents first, then directory modes and times
    deepest first (a directory's mtime moves whenever something is renamed into it)."""
    s.open_work_dirs(create=False)
    stats = ApplyStats(warnings=list(journal.warnings))
    for op in reversed(journal.ops):  # children first
        if op.kind == DELETE:
            _delete(s, op, stats)
    for op in journal.ops:  # parents first
        if op.kind == PUT:
            _put(s, op, stats)
        elif op.kind == META:
            assert op.new is not None
            if set_meta(s, op.path, op.new, journal.owner, stats, undo=None):
                stats.count(op)
    for op in reversed(journal.ops):  # deepest first: nothing moves in any more
        if op.is_dir and op.new is not None and (
                op.kind == META or (op.kind == PUT and not exists_at(s.stage_fd, op.name))):
            _set_dir_times(s, op.path, op.new.atime_ns, op.new.mtime_ns, op.new.mode, stats)
    sync_dirs(s, journal)
    return stats


def backward(s: Session, journal: Journal) -> None:
    """Undo every operation (again: what is undone already is skipped). Puts and metas
    children first, then deletes parents first, then the old mode and times of every
    directory the switch renamed things in or out of: the old tree comes back stat for
    stat."""
    s.open_work_dirs(create=False)
    for op in reversed(journal.ops):  # children first
        if op.kind == PUT:
            _unput(s, op)
        elif op.kind == META:
            assert op.old is not None
            set_meta(s, op.path, op.old, journal.owner, None, undo=op.new)
    for op in journal.ops:  # parents first
        if op.kind == DELETE and exists_at(s.backup_fd, op.name):
            _move_back(s, op)
    # path -> (atime, mtime, mode or None): times of the directories renamed in or out
    # of, and mode too where the switch changed it.
    dirs: dict[bytes, tuple[int, int, int | None]] = {
        p: (a, m, None) for p, (a, m) in journal.times.items()}
    for op in journal.ops:
        if op.kind == META and op.is_dir and op.old is not None:
            dirs[op.path] = (op.old.atime_ns, op.old.mtime_ns, op.old.mode)
    for p in sorted(dirs, key=path_key, reverse=True):
        _set_dir_times(s, p, *dirs[p], None)
    sync_dirs(s, journal)


def sync_dirs(s: Session, journal: Journal) -> None:
    """fsync every directory of the tree that something was renamed in or out of.

    The renames themselves are not fsynced one by one: ext4, xfs and btrfs keep
    metadata operations in order, so these fsyncs before "done" (or "rolled-back")
    cover them all."""
    seen: set[bytes] = set()
    for op in journal.ops:
        parent = split(op.path)[0]
        if op.kind in (PUT, DELETE) and parent not in seen:
            seen.add(parent)
            try:
                os.fsync(s.dirs.get(parent))
            except (FileNotFoundError, UnsafePath):
                pass
    os.fsync(s.stage_fd)
    os.fsync(s.backup_fd)


# -- one operation each way -------------------------------------------------------------------


def _rename(s: Session, src_fd: int, src: bytes, dst_fd: int, dst: bytes, rel: bytes) -> None:
    step(f"rename {display(rel)}")
    try:
        os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise StrataError(f"{display(rel)}: cannot rename across filesystems (is a "
                              "mount point in the way?)") from None
        raise
    s.dirs.forget(rel)


def _delete(s: Session, op: Op, stats: ApplyStats) -> None:
    """path -> backup/N (backup/N exists = done). A directory only when it is empty by
    then: otherwise files that are not part of the update live in it, and it stays."""
    if exists_at(s.backup_fd, op.name):
        stats.count(op)
        return
    parent, name = split(op.path)
    try:
        pfd = s.dirs.get(parent)
    except FileNotFoundError:
        return
    st = lstat_at(pfd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode) and not is_empty_dir(pfd, name):
        stats.warnings.append(f"{display(op.path)}: directory kept: files that are not "
                              "part of the update are inside")
        return
    _rename(s, pfd, name, s.backup_fd, op.name, op.path)
    stats.count(op)


def _put(s: Session, op: Op, stats: ApplyStats) -> None:
    """stage/N exists = not moved in yet: whatever is at the path goes to backup/N, then
    stage/N moves into place."""
    if not exists_at(s.stage_fd, op.name):
        stats.count(op)  # moved in before a crash
        return
    parent, name = split(op.path)
    try:
        pfd = s.dirs.get(parent)
    except FileNotFoundError:
        raise StrataError(f"cannot write {display(op.path)!r}: {display(parent)!r} is "
                          "missing from the tree") from None
    st = lstat_at(pfd, name)
    if st is not None:
        if exists_at(s.backup_fd, op.name):
            raise StrataError(f"{display(op.path)!r} reappeared during the switch: "
                              "refusing to overwrite it")
        if stat.S_ISDIR(st.st_mode) and not is_empty_dir(pfd, name):
            stats.warnings.append(f"{display(op.path)}: not replaced: it is a directory "
                                  "with files that are not part of the update")
            return
        _rename(s, pfd, name, s.backup_fd, op.name, op.path)
        pfd = s.dirs.get(parent)
    _rename(s, s.stage_fd, op.name, pfd, name, op.path)
    stats.count(op)


def _unput(s: Session, op: Op) -> None:
    """Undo a put: path -> stage/N (when stage/N is gone), backup/N -> path."""
    parent, name = split(op.path)
    if not exists_at(s.stage_fd, op.name):  # it moved in: take it out again
        try:
            pfd = s.dirs.get(parent)
        except FileNotFoundError:
            pfd = -1
        st = lstat_at(pfd, name) if pfd >= 0 else None
        if st is not None:
            if op.is_dir and stat.S_ISDIR(st.st_mode) and not is_empty_dir(pfd, name):
                raise StrataError(f"cannot roll back {display(op.path)!r}: files that are "
                                  "not part of the update were put inside it")
            _rename(s, pfd, name, s.stage_fd, op.name, op.path)
    if exists_at(s.backup_fd, op.name):
        _move_back(s, op)


def _move_back(s: Session, op: Op) -> None:
    parent, name = split(op.path)
    pfd = s.dirs.get(parent)
    if exists_at(pfd, name):
        raise StrataError(f"cannot roll back {display(op.path)!r}: something else is there "
                          f"now (the old version is in {display(s.work)}/backup/{op.n})")
    _rename(s, s.backup_fd, op.name, pfd, name, op.path)


# -- metadata in place ------------------------------------------------------------------------


def set_meta(s: Session, rel: bytes, meta: Meta, owner: bool, stats: ApplyStats | None,
             undo: Meta | None) -> bool:
    """Set owner, xattrs and (not for directories: see _set_dir_times) mode and times of
    `rel` in place, a symlink's own included. `undo`: when rolling back, the values being
    undone (their xattrs go too). Returns False if the path is gone."""
    parent, name = split(rel)
    step(f"meta {display(rel)}")
    try:
        pfd = s.dirs.get(parent)
    except FileNotFoundError:
        pfd = -1
    st = lstat_at(pfd, name) if pfd >= 0 else None
    if st is None:
        if stats is not None:
            stats.warnings.append(f"{display(rel)}: metadata not applied: the path is gone")
        return False
    current = read_xattrs(node_path(pfd, name))
    undoing = set(undo.xattrs) if undo is not None else set()
    stale = {k for k in current if k.startswith(SYNCED) or k in undoing}

    def warn(what: str, exc: OSError) -> None:
        if stats is not None:
            stats.warnings.append(f"{display(rel)}: {what}: {exc.strerror or exc}")

    apply_meta(Node.at(pfd, name, st.st_mode), meta, owner=owner, stale=stale,
               current=current, warn=warn)
    return True


def _set_dir_times(s: Session, rel: bytes, atime_ns: int, mtime_ns: int, mode: int | None,
                   stats: ApplyStats | None) -> None:
    step(f"dirmeta {display(rel)}")
    try:
        fd = s.dirs.get(rel)
    except (FileNotFoundError, UnsafePath):
        return  # kept elsewhere or gone: nothing of ours to set
    try:
        set_dir_meta(fd, atime_ns, mtime_ns, mode)
    except OSError as exc:
        if stats is not None:
            stats.warnings.append(f"{display(rel)}: could not set mode/mtime: "
                                  f"{exc.strerror}")

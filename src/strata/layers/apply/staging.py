"""Staging: turn the changes into operations, and write every new object beside the tree
(stage/N, fsynced) before the journal is written. Nothing in the tree changes here."""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from strata.errors import CorruptData, StrataError, UnsafePath
from strata.layers.apply.crashpoints import step
from strata.layers.apply.format import STAGE, Journal, Op, OpAction, OpKind
from strata.layers.apply.session import Session
from strata.layers.changes import Action, Change
from strata.model.entry import Entry, EntryType
from strata.tree.dirfd import exists_at, lstat_at, split
from strata.tree.meta import Meta
from strata.tree.order import path_key
from strata.tree.scan import display
from strata.tree.writer import TreeWriter, validate_path
from strata.tree.xattrs import node_path, read_xattrs

PUT, META, DELETE, SKIP = OpKind.PUT, OpKind.META, OpKind.DELETE, OpKind.SKIP

TYPE_BITS = {
    EntryType.FILE: stat.S_IFREG,
    EntryType.HARDLINK: stat.S_IFREG,
    EntryType.DIR: stat.S_IFDIR,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.FIFO: stat.S_IFIFO,
    EntryType.CHARDEV: stat.S_IFCHR,
    EntryType.BLOCKDEV: stat.S_IFBLK,
}

Data = Callable[[Entry], Iterable[bytes]]


def mount_id(fd: int) -> tuple[str, int]:
    """The mount an fd lives on: rename(2) works only within one (EXDEV otherwise)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"mnt_id:"):
                    return "mnt", int(line.split()[1])
    except OSError:
        pass
    return "dev", os.fstat(fd).st_dev


def checked(changes: list[Change], work_rel: bytes | None) -> list[Change]:
    """Validate every path before anything is written; sort by path_key. `work_rel`: the
    work directory's path in the tree (None if outside), which no change may touch."""
    seen: set[bytes] = set()
    for ch in changes:
        p = ch.path
        validate_path(p)
        if p in seen:
            raise StrataError(f"{display(p)}: more than one change for the same path")
        seen.add(p)
        if work_rel is not None and (p == work_rel or p.startswith(work_rel + b"/") or (
                work_rel.startswith(p + b"/") and ch.action is not Action.META)):
            raise UnsafePath(f"refusing to change {display(p)!r}: the apply work "
                             "directory is there")
        if ch.action is not Action.DELETE:
            e = ch.entry
            if e is None:
                raise StrataError(f"{display(p)}: {ch.action.value} without a target entry")
            if e.type not in TYPE_BITS:
                raise StrataError(f"{display(p)}: unknown entry type {e.type!r}")
            if e.type is EntryType.HARDLINK:
                try:
                    validate_path(e.link_target)
                except UnsafePath as exc:
                    raise UnsafePath(f"hardlink {display(p)!r} -> {exc}") from None
    return sorted(changes, key=lambda ch: path_key(ch.path))


class Stager:
    """Plans and stages one apply in a session whose stage/ and backup/ are open."""

    def __init__(self, s: Session, owner: bool) -> None:
        self.s = s
        self.journal = Journal(owner=owner)
        self.planned: dict[bytes, Op] = {}

    def stage(self, changes: list[Change], data: Data) -> Journal:
        """Plan `changes` (checked and sorted) and stage their objects; returns the
        journal to write. `data(entry)` yields a FILE's content and must raise (e.g.
        CorruptData) on bad bytes."""
        s, journal = self.s, self.journal
        stage_mount = mount_id(s.stage_fd)
        if mount_id(s.root_fd) != stage_mount:
            raise StrataError(f"the apply work directory {display(s.work)} is not on the "
                              f"filesystem of {display(s.root)}: files cannot be renamed "
                              "into place")
        ops: list[Op] = []
        on_disk: list[Op] = []  # ops whose parent directory exists now
        for ch in changes:
            for op, where in self._plan(ch):
                ops.append(op)
                if op.kind != SKIP:
                    self.planned[op.path] = op
                if where == "disk" and op.kind != SKIP:
                    on_disk.append(op)
        for n, op in enumerate(ops):
            op.n = n
        # Directories renamed in or out of: same mount as stage/, and their times kept.
        mounts_ok: set[bytes] = set()
        for op in on_disk:
            parent = split(op.path)[0]
            if parent not in journal.times:
                st = os.fstat(s.dirs.get(parent))
                journal.times[parent] = (st.st_atime_ns, st.st_mtime_ns)
            if op.kind != META and parent not in mounts_ok:
                if mount_id(s.dirs.get(parent)) != stage_mount:
                    raise StrataError(f"{display(parent) or '/'} is on another filesystem "
                                      f"than the apply work directory {display(s.work)}: "
                                      "files cannot be renamed into it")
                mounts_ok.add(parent)
        # durable: every staged file is fsynced (with its metadata) before the journal
        # that will move it in exists.
        writer = TreeWriter(os.path.join(s.work, STAGE.encode()), restore_owner=journal.owner,
                            durable=True)
        try:
            puts = [op for op in ops if op.kind == PUT and op.entry is not None]
            for op in puts:
                if op.entry is not None and op.entry.type is not EntryType.HARDLINK:
                    self._stage_one(writer, op, data)
            for op in puts:  # hardlinks last: their first name is staged by now
                if op.entry is not None and op.entry.type is EntryType.HARDLINK:
                    self._stage_hardlink(writer, op)
        finally:
            writer.close()  # no finish(): directory modes and times are set after the switch
        os.fsync(s.stage_fd)
        for op in ops:
            op.entry = None
        journal.ops = ops
        return journal

    # -- planning ----------------------------------------------------------------------------

    def _plan(self, ch: Change) -> list[tuple[Op, str]]:
        """The operation(s) for one change, with where its parent is: "disk" (an
        existing directory), "new" (created by this apply) or "missing"."""
        p, e = ch.path, ch.entry
        deleting = ch.action is Action.DELETE
        where, missing = self._ancestors(p, deleting)
        st = self._lstat(p) if where == "disk" else None
        if deleting:
            if st is None:  # nothing there (or beneath a directory this apply creates)
                return [(Op(SKIP, p, OpAction.DELETE), where)]
            return [(Op(DELETE, p, OpAction.DELETE), where)]
        assert e is not None
        action = OpAction(ch.action.value)
        is_dir = e.type is EntryType.DIR
        if ch.action is Action.META and not is_dir:
            if e.type is EntryType.HARDLINK:  # the inode's metadata is its first name's
                return [(Op(SKIP, p, action), where)]
            if st is None or stat.S_IFMT(st.st_mode) != TYPE_BITS[e.type]:
                what = "missing" if st is None else "of another type"
                self.journal.warnings.append(f"{display(p)}: metadata not applied: the path "
                                             f"is {what} on the endpoint")
                return [(Op(SKIP, p, action), where)]
        if st is not None and (ch.action is Action.META or is_dir) and \
                stat.S_IFMT(st.st_mode) == TYPE_BITS[e.type]:
            parent, name = split(p)
            old = Meta.of_stat(st, read_xattrs(node_path(self.s.dirs.get(parent), name)))
            return [(Op(META, p, action, is_dir, new=Meta.of_entry(e), old=old), where)]
        out: list[tuple[Op, str]] = []
        first_where = "disk" if where == "missing" else where  # where the topmost one goes
        for a in missing:  # parents neither on disk nor in the changes: create them
            d = Entry(a, EntryType.DIR, mode=0o755, uid=os.geteuid(), gid=os.getegid(),
                      mtime_ns=time.time_ns())
            op = Op(PUT, a, OpAction.MKDIR, True, new=Meta.of_entry(d), entry=d)
            out.append((op, first_where if not out else "new"))
            self.planned[a] = op
            self.journal.warnings.append(f"{display(a)}: created (a parent the changes lack)")
        size = e.size if e.type is EntryType.FILE else 0
        if ch.action is Action.META:  # a directory that is missing or not a directory
            action = OpAction.ADD if st is None else OpAction.REPLACE
        op = Op(PUT, p, action, is_dir, size, new=Meta.of_entry(e) if is_dir else None,
                entry=replace(e, path=p))
        out.append((op, where if not out else "new"))
        return out

    def _ancestors(self, p: bytes, deleting: bool) -> tuple[str, list[bytes]]:
        """Check every ancestor of `p`, top down, against the planned ops and the disk.
        Returns ("disk" | "new" | "missing", ancestors that are to be created)."""
        parts = p.split(b"/")
        where = "disk"
        missing: list[bytes] = []
        for k in range(1, len(parts)):
            a = b"/".join(parts[:k])
            op = self.planned.get(a)
            if op is not None:
                if op.is_dir and op.kind in (PUT, META):
                    if op.kind == PUT:
                        where = "new"
                    continue
                if not deleting:
                    raise StrataError(f"inconsistent changes: {display(a)!r} is deleted or "
                                      f"replaced by a non-directory, yet {display(p)!r} "
                                      "beneath it is written")
            if where != "disk":
                missing.append(a)
                continue
            if a in self.s.known_dirs:
                continue
            st = self._lstat(a)
            if st is None:
                where = "missing"
                missing.append(a)
            elif stat.S_ISDIR(st.st_mode):
                self.s.known_dirs.add(a)
            elif stat.S_ISLNK(st.st_mode):
                raise UnsafePath(f"refusing to change {display(p)!r}: {display(a)!r} in the "
                                 "tree is a symlink")
            elif deleting:
                where = "missing"  # nothing can be beneath a file
                missing.append(a)
            else:
                raise StrataError(f"cannot write {display(p)!r}: {display(a)!r} in the tree is "
                                  "not a directory and no change replaces it with one")
        if deleting:
            missing = []
        return where, missing

    def _lstat(self, rel: bytes) -> os.stat_result | None:
        parent, name = split(rel)
        try:
            return lstat_at(self.s.dirs.get(parent), name)
        except FileNotFoundError:
            return None

    # -- writing stage/ ------------------------------------------------------------------------

    def _stage_one(self, writer: TreeWriter, op: Op, data: Data) -> None:
        """Write one op's new object as stage/N (a file fsynced, with its metadata)."""
        e = op.entry
        assert e is not None
        step(f"stage {display(op.path)}")
        before = len(writer.warnings), len(self.journal.warnings)
        try:
            writer.write(replace(e, path=op.name),
                         data(e) if e.type is EntryType.FILE else None)
        except CorruptData as exc:
            raise CorruptData(f"{display(op.path)}: {exc}") from None
        self._after_staging(writer, op, before)

    def _stage_hardlink(self, writer: TreeWriter, op: Op) -> None:
        e = op.entry
        assert e is not None
        first = e.link_target
        step(f"stage {display(op.path)}")
        warnings = self.journal.warnings
        before = len(writer.warnings), len(warnings)
        fop = self.planned.get(first)
        if fop is not None and fop.kind == PUT and fop.action != OpAction.MKDIR and \
                fop.entry is not None and fop.entry.type is EntryType.FILE:
            # Both names move in from stage/: one inode before and after.
            writer.write(replace(e, path=op.name, link_target=fop.name))
        elif fop is None or fop.kind == META:
            # The first name stays in the tree: link to it now (same inode after the switch).
            parent, name = split(first)
            try:
                pfd = self.s.dirs.get(parent)
                st = lstat_at(pfd, name)
                if st is None or not stat.S_ISREG(st.st_mode):
                    raise FileNotFoundError(errno.ENOENT, "not a file in the tree")
                os.link(name, op.name, src_dir_fd=pfd, dst_dir_fd=self.s.stage_fd,
                        follow_symlinks=False)
            except OSError as exc:
                warnings.append(f"{display(op.path)}: cannot hardlink to "
                                f"{display(first)!r}: {exc.strerror or exc}")
        else:
            warnings.append(f"{display(op.path)}: cannot hardlink to {display(first)!r}: "
                            "the update does not write that file")
        self._after_staging(writer, op, before)

    def _after_staging(self, writer: TreeWriter, op: Op, before: tuple[int, int]) -> None:
        """Carry the writer's warnings over under the real path; an object that could not
        be staged (e.g. a device node without privilege) makes its op a SKIP."""
        warnings = self.journal.warnings
        staged, real = display(op.name), display(op.path)
        said = len(warnings) > before[1]
        for w in writer.warnings[before[0]:]:
            warnings.append(real + w[len(staged):] if w.startswith(staged + ":") else w)
            said = True
        if not exists_at(self.s.stage_fd, op.name):
            op.kind = SKIP
            if not said:
                warnings.append(f"{real}: could not be staged: left as it is")

"""Switch an endpoint's tree to its target under a journal: whenever the power goes, the
next start ends in either the whole old tree or the whole new tree, never a mix.

Everything happens in `work`, a directory on the same filesystem as the tree (the agent
uses ROOT/.strata-apply and excludes it from scans)::

    phase      how far the apply got (tiny JSON); no phase file = nothing pending
    journal    the operations (msgpack), written once, complete, before the switch starts
    stage/N    operation N's new object (file, directory, symlink, ...) until it moves in
    backup/N   what operation N moved out of the tree, until the apply is finished

Phases: ``staging`` -> ``staged`` -> ``switching`` -> ``done``, or, when the switch fails,
``switching`` -> ``rolling-back`` -> ``rolled-back``. Every change to `phase` is an atomic,
fsynced replace. Nothing in the tree is touched before ``switching`` is on disk, so
``recover()`` discards a ``staging``/``staged`` apply, rolls a ``switching`` one forward,
finishes a rollback, and after ``done``/``rolled-back`` only cleans up.

Each change becomes one operation, and each operation is one or two renames whose state
can be read off the disk, so both directions are idempotent and a crash inside recovery
is recovered again the same way:

* put (ADD/REPLACE, and missing parent directories): if stage/N exists the new object has
  not moved in yet; then whatever is at the path is renamed to backup/N and stage/N is
  renamed into place. Undo: path -> stage/N (when stage/N is gone), backup/N -> path.
* delete: the path is renamed to backup/N (backup/N exists = done); a directory only when
  it is empty by then, otherwise it stays with a warning (files that are not part of the
  update live in it). Undo: backup/N -> path.
* meta (META, and ADD/REPLACE of a directory that is already a directory): mode, owner,
  times and xattrs set in place; the old values are in the journal for the rollback.

Deletes run children first, then puts and metas parents first, then directory modes and
times deepest first (a directory's mtime moves whenever something is renamed into it).
A rollback undoes puts and metas children first, then deletes parents first, then puts
back the old mode and times of every directory the switch renamed things in or out of,
so the old tree comes back stat for stat.

Paths are validated, every directory of the tree is reached with openat(O_NOFOLLOW) from
a held fd of the root and every rename is relative to such fds: a symlink in the tree
(placed by a user, or swapped in mid-way) cannot redirect a write outside it.

Durability relies on the filesystem keeping metadata operations in order (ext4, xfs and
btrfs do): the renames of one switch are not fsynced one by one, but every directory
they touched is fsynced before ``done`` (or ``rolled-back``) is written.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import msgpack

from strata.errors import CorruptData, StrataError, UnsafePath
from strata.layers.changes import Action, Change
from strata.model.entry import Entry, EntryType
from strata.tree.order import path_key
from strata.tree.scan import display
from strata.tree.writer import TreeWriter, validate_path

# Tests only: called with a label ("phase switching", "rename usr/bin/x", ...) before every
# step that changes the disk, so a test can kill the process at an exact point.
crash_hook: Callable[[str], None] | None = None

_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FD_CACHE_SIZE = 64
_VERSION = 1
_PHASE, _JOURNAL, _STAGE, _BACKUP = "phase", "journal", "stage", "backup"
# Namespaces a target entry owns on an existing path: extra attributes there get removed
# (security.* stays, e.g. an SELinux label). The kernel allows only some on symlinks.
_SYNCED_XATTRS = (b"user.", b"trusted.", b"system.posix_acl_")
_SYMLINK_XATTRS = (b"trusted.", b"security.")

# Operation kinds.
PUT, META, DELETE, SKIP = "put", "meta", "delete", "skip"
# What the agent's recover() reports.
COMPLETED, DISCARDED, ROLLED_BACK = "completed", "discarded", "rolled-back"

_TYPE_BITS = {
    EntryType.FILE: stat.S_IFREG,
    EntryType.HARDLINK: stat.S_IFREG,
    EntryType.DIR: stat.S_IFDIR,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.FIFO: stat.S_IFIFO,
    EntryType.CHARDEV: stat.S_IFCHR,
    EntryType.BLOCKDEV: stat.S_IFBLK,
}


@dataclass
class ApplyStats:
    """What a switch did. `bytes` counts the file content moved into the tree."""

    added: int = 0
    replaced: int = 0
    meta: int = 0
    deleted: int = 0
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)

    def count(self, op: _Op) -> None:
        if op.action == "add":
            self.added += 1
        elif op.action == "replace":
            self.replaced += 1
        elif op.action == "meta":
            self.meta += 1
        elif op.action == "delete":
            self.deleted += 1
        if op.kind == PUT:
            self.bytes += op.size


# Metadata as the journal keeps it: [mode, uid, gid, atime_ns, mtime_ns, {xattr: value}].
_Meta = list


@dataclass(slots=True)
class _Op:
    kind: str  # PUT, META, DELETE or SKIP
    path: bytes
    action: str  # add, replace, meta, delete, or mkdir (a missing parent directory)
    is_dir: bool = False  # the target is a directory (its mode and times are set last)
    size: int = 0  # FILE bytes a put brings
    new: _Meta | None = None  # target metadata (META ops, directory puts)
    old: _Meta | None = None  # metadata found before the switch (META ops)
    n: int = 0  # index: the name under stage/ and backup/
    entry: Entry | None = None  # only while staging

    @property
    def name(self) -> bytes:
        return b"%d" % self.n

    def pack(self) -> list:
        return [self.n, self.kind, self.path, self.action, self.is_dir, self.size, self.new,
                self.old]

    @classmethod
    def unpack(cls, row: list) -> _Op:
        n, kind, path, action, is_dir, size, new, old = row
        return cls(kind, path, action, is_dir, size, new, old, n)


@dataclass
class _Journal:
    ops: list[_Op] = field(default_factory=list)
    # Old (atime_ns, mtime_ns) of every existing directory the switch renames things in or
    # out of: renames move them, a rollback puts them back.
    times: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    owner: bool = False  # set owners (the agent runs as root)
    warnings: list[str] = field(default_factory=list)  # from staging

    def dump(self) -> bytes:
        return msgpack.packb({"v": _VERSION, "owner": self.owner, "warnings": self.warnings,
                              "times": [[p, a, m] for p, (a, m) in self.times.items()],
                              "ops": [op.pack() for op in self.ops]}, use_bin_type=True)

    @classmethod
    def load(cls, raw: bytes) -> _Journal:
        doc = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        if doc.get("v") != _VERSION:
            raise ValueError(f"journal version {doc.get('v')!r}")
        return cls(ops=[_Op.unpack(r) for r in doc["ops"]],
                   times={p: (a, m) for p, a, m in doc["times"]},
                   owner=doc["owner"], warnings=list(doc["warnings"]))


def _step(label: str) -> None:
    if crash_hook is not None:
        crash_hook(label)


def _parent(p: bytes) -> tuple[bytes, bytes]:
    parent, _, name = p.rpartition(b"/")
    return parent, name


def _lstat(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _exists(dir_fd: int, name: bytes) -> bool:
    return _lstat(dir_fd, name) is not None


def _is_empty_dir(dir_fd: int, name: bytes) -> bool:
    fd = os.open(name, _DIR_OPEN, dir_fd=dir_fd)
    try:
        return not os.listdir(fd)
    finally:
        os.close(fd)


def _mount_id(fd: int) -> tuple[str, int]:
    """The mount an fd lives on: rename(2) works only within one (EXDEV otherwise)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"mnt_id:"):
                    return "mnt", int(line.split()[1])
    except OSError:
        pass
    return "dev", os.fstat(fd).st_dev


def _xattr_path(dir_fd: int, name: bytes) -> bytes:
    # No *xattrat() calls: go through the held directory fd, never a path from the root.
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


def _read_xattrs(dir_fd: int, name: bytes) -> dict[bytes, bytes]:
    path = _xattr_path(dir_fd, name)
    try:
        keys = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out = {}
    for key in keys:
        try:
            out[os.fsencode(key)] = os.getxattr(path, key, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
    return out


def _meta_of(st: os.stat_result, xattrs: dict[bytes, bytes]) -> _Meta:
    return [stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns,
            xattrs]


def _meta_from_entry(e: Entry) -> _Meta:
    return [e.mode & 0o7777, e.uid, e.gid, e.mtime_ns, e.mtime_ns, dict(e.xattrs)]


class _Dirs:
    """Directory fds beneath the root, reached one component at a time with O_NOFOLLOW
    (a small LRU cache). Renames must `forget` what they move."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._fds: OrderedDict[bytes, int] = OrderedDict()

    def get(self, rel: bytes) -> int:
        """The fd of directory `rel` ("" = the root); valid until the next `get`.

        FileNotFoundError if it is missing, UnsafePath if a component is a symlink or
        not a directory."""
        if not rel:
            return self.root_fd
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
            return fd
        parent, name = _parent(rel)
        pfd = self.get(parent)
        try:
            fd = os.open(name, _DIR_OPEN, dir_fd=pfd)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = _lstat(pfd, name)
            what = "a symlink" if st is not None and stat.S_ISLNK(st.st_mode) else \
                "not a directory"
            raise UnsafePath(f"refusing to go through {display(rel)!r}: it is {what}") from None
        self._fds[rel] = fd
        if len(self._fds) > _FD_CACHE_SIZE:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def forget(self, rel: bytes) -> None:
        prefix = rel + b"/"
        for key in [k for k in self._fds if k == rel or k.startswith(prefix)]:
            os.close(self._fds.pop(key))

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])


class _Session:
    """Held fds for one call: the root, the work dir (locked), stage/ and backup/."""

    def __init__(self, root_fd: int, work_fd: int) -> None:
        self.root_fd = root_fd
        self.work_fd = work_fd
        self.dirs = _Dirs(root_fd)
        self.stage_fd = -1
        self.backup_fd = -1
        self.known_dirs: set[bytes] = set()  # staging: directories checked on disk

    def open_work_dirs(self, create: bool) -> None:
        fds = []
        for name in (_STAGE, _BACKUP):
            if create:
                os.mkdir(name, 0o700, dir_fd=self.work_fd)
            try:
                fds.append(os.open(name, _DIR_OPEN, dir_fd=self.work_fd))
            except FileNotFoundError:
                raise StrataError(f"the apply journal's {name}/ directory is missing: the "
                                  "apply cannot be finished or rolled back") from None
        self.stage_fd, self.backup_fd = fds

    def close(self) -> None:
        self.dirs.close()
        for fd in (self.stage_fd, self.backup_fd, self.root_fd, self.work_fd):
            if fd >= 0:
                os.close(fd)  # closing work_fd releases the lock


class ApplyJournal:
    """Stage a list of changes beside an endpoint's tree, then switch the tree to them
    under a journal (see the module docstring for the design)."""

    def __init__(self, root: Path, work: Path) -> None:
        """`root`: the endpoint's tree. `work`: a directory on the same filesystem (the
        agent passes ROOT/.strata-apply); created if needed. Changes may not touch it."""
        self.root = os.path.abspath(os.fsencode(root))
        self.work = os.path.abspath(os.fsencode(work))
        rel = os.path.relpath(self.work, self.root)
        if os.path.relpath(self.root, self.work).split(b"/")[0] != b"..":
            raise StrataError("the apply work directory cannot be or contain the tree")
        self._work_rel = None if rel.split(b"/")[0] == b".." else rel
        self.restore_owner = os.geteuid() == 0
        os.makedirs(self.work, mode=0o700, exist_ok=True)

    # -- public API ------------------------------------------------------------------------

    def pending(self) -> str | None:
        """The phase of an unfinished apply found on disk ("staging", "staged",
        "switching", "done", "rolling-back", "rolled-back"), or None."""
        try:
            with open(os.path.join(self.work, _PHASE.encode()), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            return str(json.loads(raw)["phase"])
        except (ValueError, KeyError, TypeError):
            raise StrataError(f"unreadable apply phase file in {display(self.work)}") from None

    def recover(self) -> str | None:
        """Finish what a killed run left: roll a started switch forward, discard an
        unfinished staging, finish a started rollback. Returns "completed", "discarded",
        "rolled-back", or None when nothing was pending."""
        with self._session() as s:
            phase = self.pending()
            if phase is None:
                self._cleanup(s, remove_phase=False)  # stray files of a finished run
                return None
            if phase in ("staging", "staged"):
                self._cleanup(s)
                return DISCARDED
            if phase == "switching":
                self._forward(s, self._load())
                phase = self._set_phase(s, "done")
            elif phase == "rolling-back":
                self._backward(s, self._load())
                phase = self._set_phase(s, "rolled-back")
            if phase not in ("done", "rolled-back"):
                raise StrataError(f"unknown apply phase {phase!r} in {display(self.work)}")
            self._cleanup(s)
            return COMPLETED if phase == "done" else ROLLED_BACK

    def rollback(self) -> str | None:
        """Restore the old tree from the backups (a switch that failed, e.g. disk full).
        Returns "rolled-back", "discarded" (nothing was switched yet) or None."""
        with self._session() as s:
            phase = self.pending()
            if phase is None:
                return None
            if phase in ("staging", "staged"):
                self._cleanup(s)
                return DISCARDED
            if phase == "done":
                self._cleanup(s)
                raise StrataError("the switch had already completed: nothing to roll back")
            if phase in ("switching", "rolling-back"):
                if phase == "switching":
                    self._set_phase(s, "rolling-back")
                self._backward(s, self._load())
                self._set_phase(s, "rolled-back")
            elif phase != "rolled-back":
                raise StrataError(f"unknown apply phase {phase!r} in {display(self.work)}")
            self._cleanup(s)
            return ROLLED_BACK

    def stage(self, changes: list[Change], data: Callable[[Entry], Iterable[bytes]]) -> None:
        """Write every ADD/REPLACE target into work/stage with its metadata (files fsynced),
        then the journal, durably. Nothing in the tree changes. `data(entry)` yields a
        FILE's content; it must raise (e.g. CorruptData) on bad bytes: staging then fails
        and is discarded. Raises StrataError if an apply is pending (recover first),
        UnsafePath for paths that would leave the tree."""
        changes = self._checked(changes)
        with self._session() as s:
            phase = self.pending()
            if phase is not None:
                raise StrataError(f"an unfinished apply is pending in {display(self.work)} "
                                  f"(phase {phase}): recover it first")
            self._cleanup(s, remove_phase=False)
            self._set_phase(s, "staging")
            try:
                s.open_work_dirs(create=True)
                journal = self._stage(s, changes, data)
                _step("journal")
                self._write_durably(s, _JOURNAL, journal.dump())
                self._set_phase(s, "staged")
            except BaseException:
                try:
                    self._cleanup(s)
                except OSError:
                    pass  # the "staging" phase stays: recover() discards it
                raise

    def switch(self) -> ApplyStats:
        """Carry out the staged changes (phase "switching", durably, first), then mark the
        apply done and remove stage, backups and journal. On an exception the journal
        stays "switching": call rollback() or recover()."""
        with self._session() as s:
            phase = self.pending()
            if phase not in ("staged", "switching"):
                raise StrataError(f"nothing staged to switch (apply phase: {phase})")
            journal = self._load()
            if phase == "staged":
                self._set_phase(s, "switching")
            stats = self._forward(s, journal)
            self._set_phase(s, "done")
            stats.warnings += self._cleanup(s)
            return stats

    def apply(self, changes: list[Change],
              data: Callable[[Entry], Iterable[bytes]]) -> ApplyStats:
        """stage() then switch(); if the switch raises, roll back and re-raise."""
        if not changes:
            if self.pending() is not None:
                raise StrataError(f"an unfinished apply is pending in {display(self.work)}: "
                                  "recover it first")
            return ApplyStats()
        self.stage(changes, data)
        try:
            return self.switch()
        except Exception as exc:
            try:
                self.rollback()
            except Exception as again:
                exc.add_note(f"rolling back failed too ({again}); the next recovery retries")
            raise

    # -- sessions, phase and journal files ------------------------------------------------

    @contextmanager
    def _session(self) -> Iterator[_Session]:
        os.makedirs(self.work, mode=0o700, exist_ok=True)
        work_fd = os.open(self.work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(work_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(work_fd)
            raise StrataError(f"another apply is running on {display(self.root)}") from None
        try:
            root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except BaseException:
            os.close(work_fd)
            raise
        s = _Session(root_fd, work_fd)
        try:
            yield s
        finally:
            s.close()

    def _write_durably(self, s: _Session, name: str, data: bytes) -> None:
        tmp = f".{name}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=s.work_fd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=s.work_fd, dst_dir_fd=s.work_fd)
            os.fsync(s.work_fd)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StrataError(f"no space left to write the apply {name}: "
                                  f"{exc.strerror}") from None
            raise

    def _set_phase(self, s: _Session, phase: str) -> str:
        _step(f"phase {phase}")
        self._write_durably(s, _PHASE, json.dumps({"phase": phase}).encode())
        return phase

    def _load(self) -> _Journal:
        try:
            with open(os.path.join(self.work, _JOURNAL.encode()), "rb") as f:
                return _Journal.load(f.read())
        except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
            raise StrataError(f"the apply journal in {display(self.work)} is unreadable "
                              f"({e}): the tree may be half switched") from None

    def _cleanup(self, s: _Session, remove_phase: bool = True) -> list[str]:
        """Remove stage/, backup/ and the journal, then the phase file (last: until it
        goes, a crash here is cleaned up again). Returns warnings for what would not go."""
        _step("cleanup")
        warnings = []
        for fd in (s.stage_fd, s.backup_fd):
            if fd >= 0:
                os.close(fd)
        s.stage_fd = s.backup_fd = -1
        for name in (_STAGE, _BACKUP):
            path = os.path.join(self.work, name.encode())
            if os.path.lexists(path):
                _rmtree(path, warnings)
        for name in (_JOURNAL, f".{_JOURNAL}.tmp", f".{_PHASE}.tmp",
                     *((_PHASE,) if remove_phase else ())):
            try:
                os.unlink(name, dir_fd=s.work_fd)
            except FileNotFoundError:
                pass
        os.fsync(s.work_fd)
        return warnings

    # -- staging ---------------------------------------------------------------------------

    def _checked(self, changes: list[Change]) -> list[Change]:
        """Validate every path before anything is written; sort by path_key."""
        seen: set[bytes] = set()
        work = self._work_rel
        for ch in changes:
            p = ch.path
            validate_path(p)
            if p in seen:
                raise StrataError(f"{display(p)}: more than one change for the same path")
            seen.add(p)
            if work is not None and (p == work or p.startswith(work + b"/") or (
                    work.startswith(p + b"/") and ch.action is not Action.META)):
                raise UnsafePath(f"refusing to change {display(p)!r}: the apply work "
                                 "directory is there")
            if ch.action is not Action.DELETE:
                e = ch.entry
                if e is None:
                    raise StrataError(f"{display(p)}: {ch.action.value} without a target entry")
                if e.type not in _TYPE_BITS:
                    raise StrataError(f"{display(p)}: unknown entry type {e.type!r}")
                if e.type is EntryType.HARDLINK:
                    try:
                        validate_path(e.link_target)
                    except UnsafePath as exc:
                        raise UnsafePath(f"hardlink {display(p)!r} -> {exc}") from None
        return sorted(changes, key=lambda ch: path_key(ch.path))

    def _stage(self, s: _Session, changes: list[Change],
               data: Callable[[Entry], Iterable[bytes]]) -> _Journal:
        journal = _Journal(owner=self.restore_owner)
        stage_mount = _mount_id(s.stage_fd)
        if _mount_id(s.root_fd) != stage_mount:
            raise StrataError(f"the apply work directory {display(self.work)} is not on the "
                              f"filesystem of {display(self.root)}: files cannot be renamed "
                              "into place")
        planned: dict[bytes, _Op] = {}
        ops: list[_Op] = []
        on_disk: list[_Op] = []  # ops whose parent directory exists now
        for ch in changes:
            for op, where in self._plan(s, ch, planned, journal):
                ops.append(op)
                if op.kind != SKIP:
                    planned[op.path] = op
                if where == "disk" and op.kind != SKIP:
                    on_disk.append(op)
        for n, op in enumerate(ops):
            op.n = n
        # Directories renamed in or out of: same mount as stage/, and their times kept.
        mounts_ok: set[bytes] = set()
        for op in on_disk:
            parent = _parent(op.path)[0]
            if parent not in journal.times:
                st = os.fstat(s.dirs.get(parent))
                journal.times[parent] = (st.st_atime_ns, st.st_mtime_ns)
            if op.kind != META and parent not in mounts_ok:
                if _mount_id(s.dirs.get(parent)) != stage_mount:
                    raise StrataError(f"{display(parent) or '/'} is on another filesystem "
                                      f"than the apply work directory {display(self.work)}: "
                                      "files cannot be renamed into it")
                mounts_ok.add(parent)
        writer = TreeWriter(os.path.join(self.work, _STAGE.encode()),
                            restore_owner=self.restore_owner)
        try:
            sync_all = False
            puts = [op for op in ops if op.kind == PUT and op.entry is not None]
            for op in puts:
                if op.entry.type is not EntryType.HARDLINK:
                    sync_all |= self._stage_one(s, writer, op, data, journal)
            for op in puts:  # hardlinks last: their first name is staged by now
                if op.entry.type is EntryType.HARDLINK:
                    self._stage_hardlink(s, writer, op, planned, journal)
        finally:
            writer.close()  # no finish(): directory modes and times are set after the switch
        if sync_all:
            os.sync()
        os.fsync(s.stage_fd)
        for op in ops:
            op.entry = None
        journal.ops = ops
        return journal

    def _plan(self, s: _Session, ch: Change, planned: dict[bytes, _Op],
              journal: _Journal) -> list[tuple[_Op, str]]:
        """The operation(s) for one change, with where its parent is: "disk" (an
        existing directory), "new" (created by this apply) or "missing"."""
        p, e = ch.path, ch.entry
        deleting = ch.action is Action.DELETE
        where, missing = self._ancestors(s, p, planned, deleting)
        st = self._lstat(s, p) if where == "disk" else None
        if deleting:
            if st is None:  # nothing there (or beneath a directory this apply creates)
                return [(_Op(SKIP, p, "delete"), where)]
            return [(_Op(DELETE, p, "delete"), where)]
        assert e is not None
        action = ch.action.value
        is_dir = e.type is EntryType.DIR
        if ch.action is Action.META and not is_dir:
            if e.type is EntryType.HARDLINK:  # the inode's metadata is its first name's
                return [(_Op(SKIP, p, action), where)]
            if st is None or stat.S_IFMT(st.st_mode) != _TYPE_BITS[e.type]:
                what = "missing" if st is None else "of another type"
                journal.warnings.append(f"{display(p)}: metadata not applied: the path is "
                                        f"{what} on the endpoint")
                return [(_Op(SKIP, p, action), where)]
        if st is not None and (ch.action is Action.META or is_dir) and \
                stat.S_IFMT(st.st_mode) == _TYPE_BITS[e.type]:
            parent, name = _parent(p)
            old = _meta_of(st, _read_xattrs(s.dirs.get(parent), name))
            return [(_Op(META, p, action, is_dir, new=_meta_from_entry(e), old=old), where)]
        out: list[tuple[_Op, str]] = []
        first_where = "disk" if where == "missing" else where  # where the topmost one goes
        for a in missing:  # parents neither on disk nor in the changes: create them
            now = time.time_ns()
            d = Entry(a, EntryType.DIR, mode=0o755, uid=os.geteuid(), gid=os.getegid(),
                      mtime_ns=now)
            op = _Op(PUT, a, "mkdir", True, new=_meta_from_entry(d), entry=d)
            out.append((op, first_where if not out else "new"))
            planned[a] = op
            journal.warnings.append(f"{display(a)}: created (a parent the changes lack)")
        size = e.size if e.type is EntryType.FILE else 0
        if ch.action is Action.META:  # a directory that is missing or not a directory
            action = "add" if st is None else "replace"
        op = _Op(PUT, p, action, is_dir, size,
                 new=_meta_from_entry(e) if is_dir else None, entry=replace(e, path=p))
        out.append((op, where if not out else "new"))
        return out

    def _ancestors(self, s: _Session, p: bytes, planned: dict[bytes, _Op],
                   deleting: bool) -> tuple[str, list[bytes]]:
        """Check every ancestor of `p`, top down, against the planned ops and the disk.
        Returns ("disk" | "new" | "missing", ancestors that are to be created)."""
        parts = p.split(b"/")
        where = "disk"
        missing: list[bytes] = []
        for k in range(1, len(parts)):
            a = b"/".join(parts[:k])
            op = planned.get(a)
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
            if a in s.known_dirs:
                continue
            st = self._lstat(s, a)
            if st is None:
                where = "missing"
                missing.append(a)
            elif stat.S_ISDIR(st.st_mode):
                s.known_dirs.add(a)
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

    def _lstat(self, s: _Session, rel: bytes) -> os.stat_result | None:
        parent, name = _parent(rel)
        try:
            return _lstat(s.dirs.get(parent), name)
        except FileNotFoundError:
            return None

    def _stage_one(self, s: _Session, writer: TreeWriter, op: _Op,
                   data: Callable[[Entry], Iterable[bytes]], journal: _Journal) -> bool:
        """Write one op's new object as stage/N. Returns True if it could not be fsynced
        on its own (the caller then syncs everything)."""
        e = op.entry
        assert e is not None
        name = op.name
        _step(f"stage {display(op.path)}")
        before = len(writer.warnings), len(journal.warnings)
        writer.write(replace(e, path=name), data(e) if e.type is EntryType.FILE else None)
        sync_all = False
        if e.type is EntryType.FILE:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=s.stage_fd)
            except PermissionError:
                sync_all = True
            else:
                try:
                    size = os.fstat(fd).st_size
                    if size != e.size:
                        raise CorruptData(f"{display(op.path)}: the data delivered {size} "
                                          f"bytes, the entry says {e.size}")
                    os.fsync(fd)
                finally:
                    os.close(fd)
        self._after_staging(s, writer, op, before, journal)
        return sync_all

    def _stage_hardlink(self, s: _Session, writer: TreeWriter, op: _Op,
                        planned: dict[bytes, _Op], journal: _Journal) -> None:
        e = op.entry
        assert e is not None
        first = e.link_target
        _step(f"stage {display(op.path)}")
        before = len(writer.warnings), len(journal.warnings)
        fop = planned.get(first)
        if fop is not None and fop.kind == PUT and fop.action != "mkdir" and \
                fop.entry is not None and fop.entry.type is EntryType.FILE:
            # Both names move in from stage/: one inode before and after.
            writer.write(replace(e, path=op.name, link_target=fop.name))
        elif fop is None or fop.kind == META:
            # The first name stays in the tree: link to it now (same inode after the switch).
            parent, name = _parent(first)
            try:
                pfd = s.dirs.get(parent)
                st = _lstat(pfd, name)
                if st is None or not stat.S_ISREG(st.st_mode):
                    raise FileNotFoundError(errno.ENOENT, "not a file in the tree")
                os.link(name, op.name, src_dir_fd=pfd, dst_dir_fd=s.stage_fd,
                        follow_symlinks=False)
            except OSError as exc:
                journal.warnings.append(f"{display(op.path)}: cannot hardlink to "
                                        f"{display(first)!r}: {exc.strerror or exc}")
        else:
            journal.warnings.append(f"{display(op.path)}: cannot hardlink to "
                                    f"{display(first)!r}: the update does not write that file")
        self._after_staging(s, writer, op, before, journal)

    def _after_staging(self, s: _Session, writer: TreeWriter, op: _Op,
                       before: tuple[int, int], journal: _Journal) -> None:
        """Carry the writer's warnings over under the real path; an object that could not
        be staged (e.g. a device node without privilege) makes its op a SKIP."""
        staged, real = display(op.name), display(op.path)
        said = len(journal.warnings) > before[1]
        for w in writer.warnings[before[0]:]:
            journal.warnings.append(real + w[len(staged):] if w.startswith(staged + ":") else w)
            said = True
        if not _exists(s.stage_fd, op.name):
            op.kind = SKIP
            if not said:
                journal.warnings.append(f"{real}: could not be staged: left as it is")

    # -- the switch and its undo -------------------------------------------------------------

    def _rename(self, s: _Session, src_fd: int, src: bytes, dst_fd: int, dst: bytes,
                rel: bytes) -> None:
        _step(f"rename {display(rel)}")
        try:
            os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise StrataError(f"{display(rel)}: cannot rename across filesystems (is a "
                                  "mount point in the way?)") from None
            raise
        s.dirs.forget(rel)

    def _forward(self, s: _Session, journal: _Journal) -> ApplyStats:
        s.open_work_dirs(create=False)
        stats = ApplyStats(warnings=list(journal.warnings))
        for op in reversed(journal.ops):  # children first
            if op.kind == DELETE:
                self._delete(s, op, stats)
        for op in journal.ops:  # parents first
            if op.kind == PUT:
                self._put(s, op, stats)
            elif op.kind == META:
                if self._set_meta(s, op.path, op.new, journal.owner, stats, undo=None):
                    stats.count(op)
        for op in reversed(journal.ops):  # deepest first: nothing moves in any more
            if op.is_dir and op.new is not None and (
                    op.kind == META or (op.kind == PUT and not _exists(s.stage_fd, op.name))):
                self._set_dir_times(s, op.path, op.new, stats, mode=True)
        self._sync_dirs(s, journal)
        return stats

    def _delete(self, s: _Session, op: _Op, stats: ApplyStats) -> None:
        if _exists(s.backup_fd, op.name):
            stats.count(op)
            return
        parent, name = _parent(op.path)
        try:
            pfd = s.dirs.get(parent)
        except FileNotFoundError:
            return
        st = _lstat(pfd, name)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode) and not _is_empty_dir(pfd, name):
            stats.warnings.append(f"{display(op.path)}: directory kept: files that are not "
                                  "part of the update are inside")
            return
        self._rename(s, pfd, name, s.backup_fd, op.name, op.path)
        stats.count(op)

    def _put(self, s: _Session, op: _Op, stats: ApplyStats) -> None:
        if not _exists(s.stage_fd, op.name):
            stats.count(op)  # moved in before a crash
            return
        parent, name = _parent(op.path)
        try:
            pfd = s.dirs.get(parent)
        except FileNotFoundError:
            raise StrataError(f"cannot write {display(op.path)!r}: {display(parent)!r} is "
                              "missing from the tree") from None
        st = _lstat(pfd, name)
        if st is not None:
            if _exists(s.backup_fd, op.name):
                raise StrataError(f"{display(op.path)!r} reappeared during the switch: "
                                  "refusing to overwrite it")
            if stat.S_ISDIR(st.st_mode) and not _is_empty_dir(pfd, name):
                stats.warnings.append(f"{display(op.path)}: not replaced: it is a directory "
                                      "with files that are not part of the update")
                return
            self._rename(s, pfd, name, s.backup_fd, op.name, op.path)
            pfd = s.dirs.get(parent)
        self._rename(s, s.stage_fd, op.name, pfd, name, op.path)
        stats.count(op)

    def _backward(self, s: _Session, journal: _Journal) -> None:
        s.open_work_dirs(create=False)
        for op in reversed(journal.ops):  # children first
            if op.kind == PUT:
                self._unput(s, op)
            elif op.kind == META:
                self._set_meta(s, op.path, op.old, journal.owner, None, undo=op.new)
        for op in journal.ops:  # parents first
            if op.kind == DELETE and _exists(s.backup_fd, op.name):
                self._move_back(s, op)
        # Old mode and times of every directory whose contents or metadata changed.
        dirs: dict[bytes, tuple[_Meta, bool]] = {
            p: ([0, 0, 0, a, m, {}], False) for p, (a, m) in journal.times.items()}
        for op in journal.ops:
            if op.kind == META and op.is_dir and op.old is not None:
                dirs[op.path] = (op.old, True)
        for p in sorted(dirs, key=path_key, reverse=True):
            meta, mode = dirs[p]
            self._set_dir_times(s, p, meta, None, mode=mode)
        self._sync_dirs(s, journal)

    def _unput(self, s: _Session, op: _Op) -> None:
        parent, name = _parent(op.path)
        if not _exists(s.stage_fd, op.name):  # it moved in: take it out again
            try:
                pfd = s.dirs.get(parent)
            except FileNotFoundError:
                pfd = -1
            st = _lstat(pfd, name) if pfd >= 0 else None
            if st is not None:
                if op.is_dir and stat.S_ISDIR(st.st_mode) and not _is_empty_dir(pfd, name):
                    raise StrataError(f"cannot roll back {display(op.path)!r}: files that are "
                                      "not part of the update were put inside it")
                self._rename(s, pfd, name, s.stage_fd, op.name, op.path)
        if _exists(s.backup_fd, op.name):
            self._move_back(s, op)

    def _move_back(self, s: _Session, op: _Op) -> None:
        parent, name = _parent(op.path)
        pfd = s.dirs.get(parent)
        if _exists(pfd, name):
            raise StrataError(f"cannot roll back {display(op.path)!r}: something else is there "
                              f"now (the old version is in {display(self.work)}/backup/"
                              f"{op.n})")
        self._rename(s, s.backup_fd, op.name, pfd, name, op.path)

    def _sync_dirs(self, s: _Session, journal: _Journal) -> None:
        """fsync every directory of the tree that something was renamed in or out of."""
        seen: set[bytes] = set()
        for op in journal.ops:
            parent = _parent(op.path)[0]
            if op.kind in (PUT, DELETE) and parent not in seen:
                seen.add(parent)
                try:
                    os.fsync(s.dirs.get(parent))
                except (FileNotFoundError, UnsafePath):
                    pass
        os.fsync(s.stage_fd)
        os.fsync(s.backup_fd)

    # -- metadata ----------------------------------------------------------------------------

    def _set_meta(self, s: _Session, rel: bytes, meta: _Meta | None, owner: bool,
                  stats: ApplyStats | None, undo: _Meta | None) -> bool:
        """Set owner, xattrs and (not for directories: see _set_dir_times) mode and times of
        `rel` in place. `undo`: when rolling back, the values being undone (their xattrs
        go too). Returns False if the path is gone."""
        assert meta is not None
        mode, uid, gid, atime, mtime, xattrs = meta
        parent, name = _parent(rel)
        _step(f"meta {display(rel)}")
        warn = stats.warnings.append if stats is not None else (lambda _w: None)
        try:
            pfd = s.dirs.get(parent)
        except FileNotFoundError:
            pfd = -1
        st = _lstat(pfd, name) if pfd >= 0 else None
        if st is None:
            if stats is not None:
                warn(f"{display(rel)}: metadata not applied: the path is gone")
            return False
        is_link = stat.S_ISLNK(st.st_mode)
        if owner:
            try:
                os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
            except OSError as exc:
                warn(f"{display(rel)}: could not set owner: {exc.strerror}")
        xpath = _xattr_path(pfd, name)
        current = _read_xattrs(pfd, name)
        undoing = set(undo[5]) if undo is not None else set()
        for key in current:
            if key not in xattrs and (key.startswith(_SYNCED_XATTRS) or key in undoing):
                try:
                    os.removexattr(xpath, key, follow_symlinks=False)
                except OSError as exc:
                    if exc.errno != errno.ENODATA:
                        warn(f"{display(rel)}: could not remove xattr {display(key)}: "
                             f"{exc.strerror}")
        for key, value in xattrs.items():
            if (is_link and not key.startswith(_SYMLINK_XATTRS)) or current.get(key) == value:
                continue
            try:
                os.setxattr(xpath, key, value, follow_symlinks=False)
            except OSError as exc:
                warn(f"{display(rel)}: could not set xattr {display(key)}: {exc.strerror}")
        if stat.S_ISDIR(st.st_mode):
            return True
        if not is_link:
            # An O_PATH fd pins the node itself; chmod through its /proc link cannot be
            # redirected by a symlink swapped in meanwhile.
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                if not stat.S_ISLNK(os.fstat(fd).st_mode):
                    os.chmod(b"/proc/self/fd/%d" % fd, mode)
            finally:
                os.close(fd)
        try:
            os.utime(name, ns=(atime, mtime), dir_fd=pfd, follow_symlinks=False)
        except OSError as exc:
            warn(f"{display(rel)}: could not set mtime: {exc.strerror}")
        return True

    def _set_dir_times(self, s: _Session, rel: bytes, meta: _Meta,
                       stats: ApplyStats | None, mode: bool) -> None:
        _step(f"dirmeta {display(rel)}")
        try:
            fd = s.dirs.get(rel)
        except (FileNotFoundError, UnsafePath):
            return  # kept elsewhere or gone: nothing of ours to set
        try:
            if mode:
                os.chmod(fd, meta[0])
            os.utime(fd, ns=(meta[3], meta[4]))
        except OSError as exc:
            if stats is not None:
                stats.warnings.append(f"{display(rel)}: could not set mode/mtime: "
                                      f"{exc.strerror}")


def _rmtree(path: bytes, warnings: list[str]) -> None:
    """Remove a work directory, making read-only directories in it writable if needed."""

    def retry(func: Callable, p: bytes, _exc: object) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
        except OSError as exc:
            warnings.append(f"{display(p)}: could not remove: {exc.strerror}")

    shutil.rmtree(path, onerror=retry)

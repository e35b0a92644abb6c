"""ApplyJournal: switching an endpoint's tree under a journal.

The old tree, the changes and the expected new tree are all built from specs here (the
new tree independently of the journal, with TreeWriter), and trees are compared by full
snapshots: type, mode, owner, mtime, size, content hash, symlink target, device number,
xattrs and hardlink groups. Crash tests kill a forked child running the apply with
SIGKILL, either at an exact step (an os._exit(9) from the module's crash hook) or after a
random delay, then recover in this process and demand exactly the old or the new tree.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import random
import shutil
import signal
import stat
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from strata.errors import CorruptData, StrataError, UnsafePath
from strata.layers.apply import ApplyJournal, ApplyStats, Phase, crashpoints, staging
from strata.layers.apply.format import Journal
from strata.layers.changes import Action, Change
from strata.model.entry import Entry, EntryType
from strata.tree.meta import Meta
from strata.tree.order import path_key
from strata.tree.writer import TreeWriter

WORK = ".strata-apply"
ROOT_USER = os.geteuid() == 0
UID = 1234 if ROOT_USER else os.getuid()
GID = 2345 if ROOT_USER else os.getgid()
T0 = 1_600_000_000_000_000_000
F, D, L, H = EntryType.FILE, EntryType.DIR, EntryType.SYMLINK, EntryType.HARDLINK


# -- specs: a tree is {path: Entry} plus {path: content} ------------------------------------


class Tree:
    def __init__(self) -> None:
        self.entries: dict[bytes, Entry] = {}
        self.content: dict[bytes, bytes] = {}

    def file(self, path: str, data: bytes, mode: int = 0o644, **kw: object) -> Tree:
        p = path.encode()
        kw.setdefault("mtime_ns", T0 + len(self.entries))
        self.entries[p] = Entry(p, F, mode=mode, size=len(data), uid=kw.pop("uid", os.getuid()),
                                gid=kw.pop("gid", os.getgid()), **kw)
        self.content[p] = data
        return self

    def dir(self, path: str, mode: int = 0o755, **kw: object) -> Tree:
        p = path.encode()
        kw.setdefault("mtime_ns", T0 + 7_000 + len(self.entries))
        self.entries[p] = Entry(p, D, mode=mode, uid=kw.pop("uid", os.getuid()),
                                gid=kw.pop("gid", os.getgid()), **kw)
        return self

    def link(self, path: str, target: str, **kw: object) -> Tree:
        p = path.encode()
        kw.setdefault("mtime_ns", T0 + 9_000 + len(self.entries))
        self.entries[p] = Entry(p, L, mode=0o777, link_target=target.encode(),
                                uid=os.getuid(), gid=os.getgid(), **kw)
        return self

    def hardlink(self, path: str, first: str) -> Tree:
        p = path.encode()
        e = dataclasses.replace(self.entries[first.encode()], path=p, type=H,
                                link_target=first.encode())
        self.entries[p] = e
        return self

    def node(self, path: str, kind: EntryType, rdev: int = 0, mode: int = 0o640) -> Tree:
        p = path.encode()
        self.entries[p] = Entry(p, kind, mode=mode, rdev=rdev, mtime_ns=T0 + 11_000,
                                uid=os.getuid(), gid=os.getgid())
        return self

    def copy(self) -> Tree:
        t = Tree()
        t.entries = {p: dataclasses.replace(e, xattrs=dict(e.xattrs))
                     for p, e in self.entries.items()}
        t.content = dict(self.content)
        return t

    def data(self, entry: Entry) -> list[bytes]:
        raw = self.content[entry.path]
        return [raw[:len(raw) // 2], raw[len(raw) // 2:]]


def build(root: Path, *trees: Tree) -> None:
    """Lay the trees down with TreeWriter (hardlinks last: their first name may sort after)."""
    entries = {p: e for t in trees for p, e in t.entries.items()}
    content = {p: c for t in trees for p, c in t.content.items()}
    order = sorted(entries, key=lambda p: (entries[p].type is H, path_key(p)))
    with TreeWriter(root) as w:
        for p in order:
            e = entries[p]
            w.write(e, [content[p]] if e.type is F else None)
        assert w.warnings == []


def diff_changes(old: Tree, new: Tree) -> list[Change]:
    """What turns the managed part of `old` into `new` (a plain diff, test-side)."""
    out = []
    for p in sorted(old.entries.keys() | new.entries.keys(), key=path_key):
        o, n = old.entries.get(p), new.entries.get(p)
        if n is None:
            out.append(Change(Action.DELETE, p, None, o))
        elif o is None:
            out.append(Change(Action.ADD, p, n))
        elif (o.type, old.content.get(p), o.link_target, o.rdev) != (
                n.type, new.content.get(p), n.link_target, n.rdev):
            out.append(Change(Action.REPLACE, p, n, o))
        elif (o.mode, o.uid, o.gid, o.xattrs) != (n.mode, n.uid, n.gid, n.xattrs) or (
                o.type is not D and o.mtime_ns != n.mtime_ns):
            out.append(Change(Action.META, p, n, o))
    return out


# -- snapshots -------------------------------------------------------------------------------


def snapshot(root: Path) -> dict:
    """path -> (type, mode, uid, gid, mtime_ns, size, sha256, symlink target, rdev, xattrs),
    hardlink groups and inode numbers, for everything under root but the work directory."""
    rootb = os.fsencode(root)
    entries: dict[bytes, tuple] = {}
    inodes: dict[bytes, int] = {}
    groups: dict[int, list[bytes]] = {}

    def walk(rel: bytes) -> None:
        for name in sorted(os.listdir(os.path.join(rootb, rel) if rel else rootb)):
            r = rel + b"/" + name if rel else name
            if r == WORK.encode():
                continue
            full = os.path.join(rootb, r)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            digest = target = None
            if stat.S_ISREG(kind):
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                if st.st_nlink > 1:
                    groups.setdefault(st.st_ino, []).append(r)
            elif stat.S_ISLNK(kind):
                target = os.readlink(full)
            xattrs = tuple(sorted((k, os.getxattr(full, k, follow_symlinks=False))
                                  for k in os.listxattr(full, follow_symlinks=False)))
            entries[r] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                          st.st_size if stat.S_ISREG(kind) else None, digest, target,
                          st.st_rdev if stat.S_ISCHR(kind) or stat.S_ISBLK(kind) else 0,
                          xattrs)
            inodes[r] = st.st_ino
            if stat.S_ISDIR(kind):
                walk(r)

    walk(b"")
    links = sorted(sorted(g) for g in groups.values() if len(g) > 1)
    return {"entries": entries, "links": links, "inodes": inodes}


def comparable(snap: dict, loose_mtimes: set[bytes] = frozenset()) -> dict:
    """Entries and hardlink groups; `loose_mtimes`: directories whose mtime is not compared
    (a directory something was renamed into gets the time of the switch)."""
    return {"entries": {p: (e[:4] + (None,) + e[5:] if p in loose_mtimes else e)
                        for p, e in snap["entries"].items()},
            "links": snap["links"]}


def diff(got: dict, want: dict) -> list[str]:
    g, w = got["entries"], want["entries"]
    out = [f"missing {p!r}" for p in sorted(w.keys() - g.keys())]
    out += [f"extra {p!r}" for p in sorted(g.keys() - w.keys())]
    out += [f"{p!r}: got {g[p]} want {w[p]}" for p in sorted(g.keys() & w.keys())
            if g[p] != w[p]]
    if got["links"] != want["links"]:
        out.append(f"hardlinks: got {got['links']} want {want['links']}")
    return out


def assert_same(got: dict, want: dict) -> None:
    problems = diff(got, want)
    assert not problems, "\n".join(problems[:20])


def assert_clean(work: Path) -> None:
    assert ApplyJournal(work.parent, work).pending() is None
    assert sorted(os.listdir(work)) == [], os.listdir(work)


# -- the scenario: an OS-like tree with user files in and beside what changes ----------------


def old_tree() -> Tree:
    t = Tree()
    t.dir("etc").file("etc/a.conf", b"a = 1\n").file("etc/b.conf", b"b = 1\n")
    t.file("etc/c.conf", b"going away\n")
    t.dir("etc/conf.d").file("etc/conf.d/x.conf", b"x\n")
    t.dir("usr").dir("usr/bin").dir("usr/lib")
    t.file("usr/bin/tool", b"#!/bin/sh\necho v1\n", 0o755)
    t.file("usr/bin/old", b"old tool\n", 0o755)
    t.link("usr/bin/link", "tool")
    t.file("usr/lib/liby.so", b"\x7fELF liby" * 50)
    t.file("usr/lib/pair1", b"shared inode\n").hardlink("usr/lib/pair2", "usr/lib/pair1")
    t.dir("opt").dir("opt/gone").file("opt/gone/f1", b"1").dir("opt/gone/sub")
    t.file("opt/gone/sub/f2", b"2")
    t.dir("opt/keep").file("opt/keep/f", b"managed")
    t.dir("t").file("t/f2d", b"file, then dir").dir("t/d2f").file("t/d2f/x", b"x")
    t.link("t/l2f", "nowhere").file("t/f2l", b"file, then link")
    t.node("t/fifo", EntryType.FIFO)
    t.dir("gen", 0o750)
    rng = random.Random(1)
    for i in range(25):
        t.file(f"gen/f{i:02d}", rng.randbytes(rng.choice((0, 10, 3000, 20000))))
    t.entries[b"etc/b.conf"].xattrs = {b"user.old": b"1"}
    return t


def new_tree(old: Tree) -> Tree:
    t = old.copy()
    rng = random.Random(2)

    def rewrite(path: str, data: bytes, **kw: object) -> None:
        e = t.entries[path.encode()]
        t.file(path, data, mode=kw.pop("mode", e.mode), **kw)

    rewrite("etc/a.conf", b"a = 2\n")
    b = t.entries[b"etc/b.conf"]
    b.mode, b.uid, b.gid, b.xattrs = 0o600, UID, GID, {b"user.tag": b"x"}
    del t.entries[b"etc/c.conf"]
    cd = t.entries[b"etc/conf.d"]
    cd.mode, cd.xattrs, cd.mtime_ns = 0o750, {b"user.d": b"1"}, T0 + 123
    rewrite("usr/bin/tool", b"#!/bin/sh\necho v2\n")
    del t.entries[b"usr/bin/old"]
    t.link("usr/bin/link", "tool2")
    t.file("usr/bin/tool2", b"#!/bin/sh\necho tool2\n", 0o755)
    rewrite("usr/lib/pair2", b"pair2 on its own now\n")
    t.entries[b"usr/lib/pair2"].type = F
    t.entries[b"usr/lib/pair2"].link_target = b""
    for p in [p for p in t.entries if p.startswith((b"opt/gone", b"opt/keep"))]:
        del t.entries[p]
        t.content.pop(p, None)
    t.dir("t/f2d", 0o711).file("t/f2d/inner", b"inside the new dir")
    del t.entries[b"t/d2f/x"]
    t.file("t/d2f", b"dir, then file")
    t.file("t/l2f", b"link, then file")
    t.content.pop(b"t/f2l")
    t.link("t/f2l", "../etc/a.conf")
    del t.entries[b"t/fifo"]
    t.node("t/newfifo", EntryType.FIFO, mode=0o600)
    for i in range(25):
        p = f"gen/f{i:02d}"
        if i % 5 == 0:
            del t.entries[p.encode()]
        elif i % 3 == 0:
            rewrite(p, rng.randbytes(rng.choice((1, 5000, 40000))))
        elif i % 7 == 0:
            t.entries[p.encode()].mode = 0o600
            t.entries[p.encode()].mtime_ns += 5
    for i in range(5):
        t.file(f"gen/new{i}", rng.randbytes(1000 * i))
    t.dir("new", 0o700, xattrs={b"user.new": b"dir"}).dir("new/deep", 0o755)
    t.file("new/deep/file", b"deep")
    t.file("new/a", b"two names, one inode").hardlink("new/b", "new/a")
    t.dir("h").hardlink("h/c", "usr/lib/liby.so")
    if ROOT_USER:
        t.dir("dev").node("dev/null0", EntryType.CHARDEV, rdev=os.makedev(1, 3), mode=0o666)
    return t


def user_tree() -> Tree:
    """Files no change names: they must survive every apply, crash and rollback as is."""
    t = Tree()
    t.dir("home").dir("home/user", 0o700).file("home/user/doc.txt", b"my thesis")
    t.file("usr/bin/user-tool", b"installed by the user", 0o755)
    t.file("opt/keep/user.txt", b"lives in a dir the update deletes")
    t.file("gen/user.dat", b"user data beside managed files")
    t.file("etc/conf.d/user.conf", b"user conf in a dir whose metadata changes")
    return t


class Scenario:
    def __init__(self, base: Path) -> None:
        self.old, self.user = old_tree(), user_tree()
        self.new = new_tree(self.old)
        self.changes = diff_changes(self.old, self.new)
        self.root = base / "root"
        self.work = self.root / WORK
        self.expected_dir = base / "expected"
        # The new tree, built independently of the journal: the image, the user's files,
        # and opt/keep, which stays (with its old metadata) because the user's file is in it.
        keep = Tree()
        keep.entries[b"opt/keep"] = self.old.entries[b"opt/keep"]
        build(self.expected_dir, self.new, self.user, keep)
        # Directories the switch renames into without a change of their own get the time
        # of the switch as mtime: not compared when checking for the new tree.
        targets = {c.path for c in self.changes if c.entry is not None and c.entry.type is D}
        self.loose = {p for p, e in snapshot(self.expected_dir)["entries"].items()
                      if stat.S_ISDIR(e[0]) and p not in targets}
        self.want_new = comparable(snapshot(self.expected_dir), self.loose)

    def fresh(self) -> dict:
        """(Re)build the old tree; returns its snapshot."""
        if self.root.exists():
            shutil.rmtree(self.root)
        build(self.root, self.old, self.user)
        ApplyJournal(self.root, self.work)  # creates the work dir (as the agent's would)
        snap = snapshot(self.root)
        self.user_inodes = {p: snap["inodes"][p] for p in self.user.entries}
        return snap

    def journal(self) -> ApplyJournal:
        return ApplyJournal(self.root, self.work)

    def apply(self) -> ApplyStats:
        return self.journal().apply(self.changes, self.new.data)

    def state(self, snap: dict, old: dict) -> str:
        """"old" or "new" if the tree is exactly one of them, else a description."""
        if comparable(snap) == comparable(old):
            return "old"
        got = comparable(snap, self.loose)
        if got == self.want_new:
            return "new"
        near_old = len(diff(comparable(snap), comparable(old)))
        return f"MIX ({near_old} diffs to old): " + "; ".join(diff(got, self.want_new)[:8])

    def assert_user_files_untouched(self, snap: dict) -> None:
        for p, e in self.user.entries.items():
            assert snap["inodes"][p] == self.user_inodes[p], p
            if e.type is F:
                want = hashlib.sha256(self.user.content[p]).hexdigest()
                assert snap["entries"][p][6] == want, p


@pytest.fixture
def scenario(tmp_path: Path) -> Scenario:
    return Scenario(tmp_path)


def counting_hook() -> tuple[list[str], Callable[[str], None]]:
    labels: list[str] = []
    return labels, labels.append


@pytest.fixture
def hook(monkeypatch):
    """Install a crash hook for the test (and remove it afterwards)."""

    def install(fn: Callable[[str], None] | None) -> None:
        monkeypatch.setattr(crashpoints, "crash_hook", fn)

    return install


class Boom(Exception):
    pass


def fail_at(n: int, exc: BaseException | None = None) -> Callable[[str], None]:
    """A hook that raises at its n-th call (1-based)."""
    calls = [0]

    def hook_fn(label: str) -> None:
        calls[0] += 1
        if calls[0] == n:
            raise exc if exc is not None else Boom(label)

    return hook_fn


# -- unit tests ------------------------------------------------------------------------------


def test_apply_switches_to_exactly_the_new_tree(scenario):
    old = scenario.fresh()
    stats = scenario.apply()
    snap = snapshot(scenario.root)
    assert_same(comparable(snap, scenario.loose), scenario.want_new)
    scenario.assert_user_files_untouched(snap)
    assert_clean(scenario.work)

    counts = {a: sum(c.action is a for c in scenario.changes) for a in Action}
    assert stats.added == counts[Action.ADD]
    assert stats.replaced == counts[Action.REPLACE]
    assert stats.meta == counts[Action.META]
    assert stats.deleted == counts[Action.DELETE] - 1  # opt/keep stays
    assert stats.bytes == sum(c.entry.size for c in scenario.changes
                              if c.action in (Action.ADD, Action.REPLACE)
                              and c.entry.type is F)
    assert stats.warnings == ["opt/keep: directory kept: files that are not part of the "
                              "update are inside"]
    e = snap["entries"]
    # type changes, hardlinks, metadata: spelled out (the snapshot comparison covers them too)
    assert stat.S_ISDIR(e[b"t/f2d"][0]) and stat.S_ISREG(e[b"t/d2f"][0])
    assert stat.S_ISREG(e[b"t/l2f"][0]) and e[b"t/f2l"][7] == b"../etc/a.conf"
    assert snap["inodes"][b"new/a"] == snap["inodes"][b"new/b"]
    assert snap["inodes"][b"h/c"] == snap["inodes"][b"usr/lib/liby.so"] == \
        old["inodes"][b"usr/lib/liby.so"]
    assert snap["inodes"][b"usr/lib/pair1"] == old["inodes"][b"usr/lib/pair1"]
    assert [b"usr/lib/pair1", b"usr/lib/pair2"] not in snap["links"]
    assert e[b"etc/b.conf"][1:4] == (0o600, UID, GID)
    assert e[b"etc/b.conf"][9] == (("user.tag", b"x"),)  # user.old removed
    assert e[b"etc/conf.d"][1] == 0o750 and e[b"etc/conf.d"][4] == T0 + 123
    assert e[b"new"][1] == 0o700 and e[b"new"][9] == (("user.new", b"dir"),)
    assert e[b"etc/b.conf"][6] == old["entries"][b"etc/b.conf"][6]  # META: same content


def test_dir_scheduled_for_deletion_keeps_user_files(tmp_path):
    root = tmp_path / "root"
    old = Tree().dir("app").file("app/bin", b"managed").dir("app/data").file("app/data/m", b"m")
    build(root, old, Tree().file("app/data/user-notes", b"mine"))
    changes = diff_changes(old, Tree())
    stats = ApplyJournal(root, root / WORK).apply(changes, old.data)
    assert sorted(snapshot(root)["entries"]) == [b"app", b"app/data", b"app/data/user-notes"]
    assert (root / "app/data/user-notes").read_bytes() == b"mine"
    assert stats.deleted == 2
    assert len(stats.warnings) == 2 and all("directory kept" in w for w in stats.warnings)


def test_replacing_a_dir_that_holds_user_files_leaves_it(tmp_path):
    root = tmp_path / "root"
    old = Tree().dir("d").file("d/managed", b"m")
    new = Tree().file("d", b"now a file")
    build(root, old, Tree().file("d/user", b"mine"))
    stats = ApplyJournal(root, root / WORK).apply(diff_changes(old, new), new.data)
    assert (root / "d/user").read_bytes() == b"mine"
    assert not (root / "d/managed").exists()  # its own deletion still happened
    assert any(w.startswith("d: not replaced") for w in stats.warnings)
    assert_clean(root / WORK)


def test_missing_parents_are_created_and_undone(tmp_path, hook):
    root = tmp_path / "root"
    build(root, Tree().file("keep", b"k"))
    new = Tree().file("a/b/c/leaf", b"leaf")
    changes = [Change(Action.ADD, b"a/b/c/leaf", new.entries[b"a/b/c/leaf"])]
    labels, count = counting_hook()
    hook(count)
    stats = ApplyJournal(root, root / WORK).apply(changes, new.data)
    assert (root / "a/b/c/leaf").read_bytes() == b"leaf"
    assert stat.S_IMODE(os.stat(root / "a/b").st_mode) == 0o755
    assert stats.added == 1 and [w.split(":")[0] for w in stats.warnings] == [
        "a", "a/b", "a/b/c"]
    # the same apply failing at its last rename is rolled back: the created dirs go too
    root2 = tmp_path / "root2"
    build(root2, Tree().file("keep", b"k"))
    ApplyJournal(root2, root2 / WORK)
    before = snapshot(root2)
    last = max(i for i, lb in enumerate(labels, 1) if lb.startswith("rename"))
    hook(fail_at(last))
    with pytest.raises(Boom):
        ApplyJournal(root2, root2 / WORK).apply(changes, new.data)
    assert snapshot(root2) == before
    assert_clean(root2 / WORK)


def test_hardlink_to_a_file_outside_the_changes_and_dangling(tmp_path):
    root = tmp_path / "root"
    base = Tree().file("lib/x.so", b"x" * 100)
    build(root, base)
    ino = os.stat(root / "lib/x.so").st_ino
    new = base.copy().hardlink("bin/x", "lib/x.so")
    new.entries[b"bin/y"] = Entry(b"bin/y", H, link_target=b"lib/missing")
    changes = [Change(Action.ADD, b"bin", Entry(b"bin", D, mode=0o755, uid=os.getuid(),
                                                gid=os.getgid())),
               Change(Action.ADD, b"bin/x", new.entries[b"bin/x"]),
               Change(Action.ADD, b"bin/y", new.entries[b"bin/y"])]
    stats = ApplyJournal(root, root / WORK).apply(changes, new.data)
    assert os.stat(root / "bin/x").st_ino == ino and os.stat(root / "bin/x").st_nlink == 2
    assert not os.path.lexists(root / "bin/y")
    assert any(w.startswith("bin/y: cannot hardlink") for w in stats.warnings)
    assert stats.added == 2


def test_meta_on_symlink_fifo_and_dir_in_place(tmp_path):
    root = tmp_path / "root"
    old = Tree().dir("d", 0o755).link("d/l", "target").node("d/p", EntryType.FIFO)
    build(root, old)
    new = old.copy()
    new.entries[b"d"].mode = 0o701
    new.entries[b"d/l"].mtime_ns = T0 + 42
    new.entries[b"d/p"].mode = 0o604
    ino = {p: os.lstat(root / p).st_ino for p in ("d", "d/l", "d/p")}
    stats = ApplyJournal(root, root / WORK).apply(diff_changes(old, new), new.data)
    assert stats.meta == 3 and stats.warnings == []
    assert {p: os.lstat(root / p).st_ino for p in ino} == ino  # in place, not recreated
    assert stat.S_IMODE(os.lstat(root / "d").st_mode) == 0o701
    assert os.lstat(root / "d/l").st_mtime_ns == T0 + 42
    assert stat.S_IMODE(os.lstat(root / "d/p").st_mode) == 0o604


def test_second_stage_while_pending_is_refused(scenario):
    scenario.fresh()
    j = scenario.journal()
    j.stage(scenario.changes, scenario.new.data)
    assert j.pending() == "staged"
    with pytest.raises(StrataError, match="recover it first"):
        scenario.journal().stage(scenario.changes, scenario.new.data)
    with pytest.raises(StrataError, match="recover it first"):
        scenario.journal().apply(scenario.changes, scenario.new.data)
    assert scenario.journal().recover() == "discarded"
    assert scenario.journal().recover() is None
    scenario.apply()  # and now it goes through


def test_concurrent_apply_is_refused(scenario, hook):
    scenario.fresh()
    seen = []

    def meddle(label: str) -> None:
        if label == "phase switching" and not seen:
            with pytest.raises(StrataError, match="another apply is running") as info:
                scenario.journal().recover()
            seen.append(info.value)

    hook(meddle)
    scenario.apply()
    assert seen
    assert_same(comparable(snapshot(scenario.root), scenario.loose), scenario.want_new)


def test_corrupt_data_fails_staging_and_switches_nothing(scenario):
    old = scenario.fresh()

    def data(entry: Entry) -> list[bytes]:
        if entry.path == b"gen/new3":
            raise CorruptData("chunk abc does not match its id")
        return scenario.new.data(entry)

    with pytest.raises(CorruptData):
        scenario.journal().apply(scenario.changes, data)
    assert_same(comparable(snapshot(scenario.root)), comparable(old))
    assert_clean(scenario.work)

    def short(entry: Entry) -> list[bytes]:
        return scenario.new.data(entry)[:1]  # a truncated stream

    with pytest.raises(CorruptData, match="bytes, the entry says"):
        scenario.journal().apply(scenario.changes, short)
    assert_same(comparable(snapshot(scenario.root)), comparable(old))
    assert_clean(scenario.work)


# -- rollback --------------------------------------------------------------------------------


def test_rollback_after_partial_switch_restores_the_old_tree_exactly(scenario, hook):
    labels, count = counting_hook()
    scenario.fresh()
    hook(count)
    scenario.apply()
    switching = labels.index("phase switching") + 1  # 1-based step numbers
    done = labels.index("phase done") + 1
    assert done - switching > 60
    rng = random.Random(3)
    points = sorted({switching + 1, switching + 2, done - 1, done,
                     *rng.sample(range(switching + 1, done), 6)})
    for n in points:
        old = scenario.fresh()
        hook(fail_at(n))
        j = scenario.journal()
        j.stage(scenario.changes, scenario.new.data)
        with pytest.raises(Boom):
            j.switch()
        assert j.pending() == "switching"
        hook(None)
        assert j.rollback() == "rolled-back"
        snap = snapshot(scenario.root)
        assert scenario.state(snap, old) == "old", (n, labels[n - 1])
        scenario.assert_user_files_untouched(snap)
        assert_clean(scenario.work)


def test_disk_full_during_switch_rolls_back(scenario, hook):
    labels, count = counting_hook()
    scenario.fresh()
    hook(count)
    scenario.apply()
    n = [i for i, lb in enumerate(labels, 1) if lb.startswith("rename")][40]
    old = scenario.fresh()
    hook(fail_at(n, OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError) as info:
        scenario.apply()
    assert info.value.errno == errno.ENOSPC
    assert scenario.state(snapshot(scenario.root), old) == "old"
    assert_clean(scenario.work)


# -- crafted input and symlinks ----------------------------------------------------------------


@pytest.mark.parametrize("bad", [b"../escape", b"/etc/passwd", b"a/../../b", b"a//b", b"./a",
                                 b""])
def test_crafted_paths_are_refused_before_anything_is_written(tmp_path, bad):
    root = tmp_path / "root"
    build(root, Tree().file("a", b"a"))
    before = snapshot(root)
    changes = [Change(Action.ADD, b"fine", Entry(b"fine", F, size=1)),
               Change(Action.ADD, bad, Entry(bad, F, size=1))]
    with pytest.raises(UnsafePath):
        ApplyJournal(root, root / WORK).apply(changes, lambda e: [b"x"])
    with pytest.raises(UnsafePath):
        ApplyJournal(root, root / WORK).apply([Change(Action.DELETE, bad, None)], None)
    assert snapshot(root) == before
    assert_clean(root / WORK)
    assert not (tmp_path / "escape").exists()


def test_crafted_hardlink_target_and_work_dir_are_refused(tmp_path):
    root = tmp_path / "root"
    build(root, Tree().file("a", b"a"))
    evil = Entry(b"x", H, link_target=b"../../etc/passwd")
    with pytest.raises(UnsafePath):
        ApplyJournal(root, root / WORK).apply([Change(Action.ADD, b"x", evil)], None)
    for p in (WORK.encode(), WORK.encode() + b"/journal"):
        with pytest.raises(UnsafePath, match="work directory"):
            ApplyJournal(root, root / WORK).apply([Change(Action.ADD, p, Entry(p, D))], None)
    assert sorted(os.listdir(root)) == [WORK, "a"]
    assert_clean(root / WORK)


def test_symlink_in_root_does_not_redirect_writes_outside(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious")
    os.chmod(outside / "victim", 0o600)
    build(root, Tree().dir("etc").file("etc/a", b"a"))
    os.symlink(outside, root / "etc/sub")  # a user's symlink pointing out of the tree
    os.symlink(outside / "victim", root / "etc/vlink")
    before_out = snapshot(outside)
    j = ApplyJournal(root, root / WORK)
    new = Tree().file("etc/sub/evil", b"evil").file("etc/sub/victim", b"overwritten")
    for ch in ([Change(Action.ADD, b"etc/sub/evil", new.entries[b"etc/sub/evil"])],
               [Change(Action.REPLACE, b"etc/sub/victim", new.entries[b"etc/sub/victim"])],
               [Change(Action.DELETE, b"etc/sub/victim", None)],
               [Change(Action.META, b"etc/sub/victim", Entry(b"etc/sub/victim", F, 0o777))]):
        with pytest.raises(UnsafePath, match="symlink"):
            j.apply(ch, new.data)
        assert j.pending() is None
    # the symlink itself may be changed: only the link, never what it points to
    j.apply([Change(Action.META, b"etc/vlink",
                    Entry(b"etc/vlink", L, mode=0o755, mtime_ns=T0, uid=UID, gid=GID,
                          xattrs={b"trusted.x": b"1"} if ROOT_USER else {},
                          link_target=str(outside / "victim").encode()))], new.data)
    assert os.lstat(root / "etc/vlink").st_mtime_ns == T0
    assert os.lstat(root / "etc/vlink").st_uid == UID
    assert snapshot(outside) == before_out  # mode, owner, mtime, xattrs of the target
    j.apply([Change(Action.REPLACE, b"etc/vlink", new.entries[b"etc/sub/victim"])],
            lambda e: [b"overwritten"])
    assert (root / "etc/vlink").read_bytes() == b"overwritten"
    assert not (root / "etc/vlink").is_symlink()
    assert snapshot(outside) == before_out


def test_parent_swapped_for_a_symlink_after_staging(tmp_path):
    """A directory replaced by a symlink between staging and the switch: the switch refuses
    (dir fds with O_NOFOLLOW), the rollback puts things back, nothing outside changes."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(b"outside")
    old = Tree().dir("a").file("a/f", b"old").dir("b").file("b/f", b"old")
    new = old.copy().file("a/f", b"new").file("b/f", b"new")
    build(root, old)
    before_out = snapshot(outside)
    j = ApplyJournal(root, root / WORK)
    j.stage(diff_changes(old, new), new.data)
    os.rename(root / "b", tmp_path / "b-moved")
    os.symlink(outside, root / "b")
    with pytest.raises(UnsafePath):
        j.switch()
    assert j.pending() == "switching"
    assert j.rollback() == "rolled-back"
    assert (root / "a/f").read_bytes() == b"old"
    assert snapshot(outside) == before_out
    assert_clean(root / WORK)


def _writable_dir_on_another_filesystem(here: Path) -> Path | None:
    """/dev/shm when the tests' scratch is on disk; /var/tmp or the checkout when it is
    on a tmpfs (the Makefile puts it there)."""
    for candidate in (Path("/dev/shm"), Path("/var/tmp"), Path(__file__).parent):
        if candidate.is_dir() and os.access(candidate, os.W_OK) and \
                os.stat(candidate).st_dev != os.stat(here).st_dev:
            return candidate
    return None


def test_work_dir_on_another_filesystem_is_refused_before_switching(tmp_path):
    elsewhere = _writable_dir_on_another_filesystem(tmp_path)
    if elsewhere is None:
        pytest.skip("needs a writable folder on another filesystem than the scratch")
    root = tmp_path / "root"
    build(root, Tree().file("a", b"old"))
    before = snapshot(root)
    work = elsewhere / f"strata-test-{os.getpid()}"
    try:
        new = Tree().file("a", b"new")
        with pytest.raises(StrataError, match="not on the filesystem"):
            ApplyJournal(root, work).apply(diff_changes(Tree().file("a", b"old"), new),
                                           new.data)
        assert ApplyJournal(root, work).pending() is None
        assert snapshot(root) == before
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_mount_point_inside_root_is_refused_before_switching(tmp_path, monkeypatch):
    """A change under a different mount inside the tree (simulated: no mount privilege
    needed) fails at staging, before any rename."""
    root = tmp_path / "root"
    old = Tree().dir("home").file("home/f", b"old").file("top", b"old")
    build(root, old)
    before = snapshot(root)
    home_dev = os.stat(root / "home").st_ino
    real = staging.mount_id
    monkeypatch.setattr(staging, "mount_id", lambda fd: ("mnt", -1) if
                        os.fstat(fd).st_ino == home_dev else real(fd))
    new = old.copy().file("home/f", b"new").file("top", b"new")
    with pytest.raises(StrataError, match="another filesystem"):
        ApplyJournal(root, root / WORK).apply(diff_changes(old, new), new.data)
    assert snapshot(root) == before
    assert_clean(root / WORK)


# -- crash tests: SIGKILL at exact steps and at random times -----------------------------------

# They kill real (forked) processes and wait for them: the end-to-end tier.
KILLS = pytest.mark.e2e


def run_child(fn: Callable[[], None], *, kill_after: float | None = None,
              go: Callable[[Callable[[], None]], None] | None = None,
              took: list[float] | None = None) -> str:
    """Run fn in a forked child. Returns "finished", "killed" (SIGKILL by us, or the hook's
    os._exit(9)) or raises if the child failed. With kill_after, SIGKILL it that long after
    it signals "go": as it starts, or, with `go`, when go(signal) calls signal(). `took`
    gets the seconds from "go" to the child's end appended."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(r)
            if go is None:
                os.write(w, b"go")
                fn()
            else:
                go(lambda: os.write(w, b"go"))
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    try:
        os.read(r, 2)
        started = time.monotonic()
        if kill_after is not None:
            deadline = time.monotonic() + kill_after
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.0005)
            else:
                os.kill(pid, signal.SIGKILL)
                done, status = os.waitpid(pid, 0)
        else:
            done, status = os.waitpid(pid, 0)
        if took is not None:
            took.append(time.monotonic() - started)
    finally:
        os.close(r)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return "killed"
    code = os.WEXITSTATUS(status)
    assert code in (0, 9), f"child failed with exit code {code}"
    return "finished" if code == 0 else "killed"


def die_at(n: int) -> Callable[[str], None]:
    calls = [0]

    def hook_fn(_label: str) -> None:
        calls[0] += 1
        if calls[0] == n:
            sys.stderr.flush()
            os._exit(9)  # as abrupt as SIGKILL: no cleanup, no finally blocks

    return hook_fn


def check_after_recovery(scenario: Scenario, old: dict, phase: str | None) -> str:
    """Recover, then demand exactly the old or the new tree (the new one if the switch had
    started), the user's files untouched and nothing left in the work dir."""
    result = scenario.journal().recover()
    snap = snapshot(scenario.root)
    state = scenario.state(snap, old)
    if phase in ("switching", "done"):
        assert result == "completed"
        assert state == "new", (phase, state)
    elif phase in ("staging", "staged"):
        assert result == "discarded"
        assert state == "old", (phase, state)
    elif phase in ("rolling-back", "rolled-back"):
        assert result == "rolled-back"
        assert state == "old", (phase, state)
    else:
        assert result is None
        assert state in ("old", "new"), state
    scenario.assert_user_files_untouched(snap)
    assert_clean(scenario.work)
    return state


@KILLS
def test_killed_at_every_kind_of_step_recovers_to_old_or_new(scenario, hook):
    labels, count = counting_hook()
    scenario.fresh()
    hook(count)
    scenario.apply()
    hook(None)
    total = len(labels)
    switching = labels.index("phase switching") + 1
    rng = random.Random(0xDEAD)
    # every phase change and the first and last steps, plus a spread over the rest
    points = {1, 2, total, switching - 1, switching, switching + 1}
    points |= {i for i, lb in enumerate(labels, 1) if lb.startswith(("phase", "journal"))}
    rest = sorted(set(range(1, total + 1)) - points)
    points |= set(rng.sample(rest, 40 - len(points)))
    outcomes = {"old": 0, "new": 0}
    for n in sorted(points):
        old = scenario.fresh()

        def child(n: int = n) -> None:
            crashpoints.crash_hook = die_at(n)
            scenario.apply()

        assert run_child(child) == "killed", n
        phase = scenario.journal().pending()
        state = check_after_recovery(scenario, old, phase)
        outcomes[state] += 1
        assert (state == "new") == (n > switching), (n, labels[n - 1], phase, state)
    assert len(points) == 40
    assert outcomes["old"] >= 5 and outcomes["new"] >= 20, outcomes


@KILLS
def test_sigkill_at_random_times_recovers_to_old_or_new(scenario):
    """Real SIGKILLs, landing anywhere (inside syscalls too): half the rounds time the kill
    from the start of the apply, half from the end of staging (the switch is short)."""

    def staged_then_switch(signal_go: Callable[[], None]) -> None:
        j = scenario.journal()
        j.stage(scenario.changes, scenario.new.data)
        signal_go()
        j.switch()

    # Kill windows: how long each takes here, shrunk whenever a run finishes before its kill
    # (adaptive, as the machine may be loaded).
    window: dict[str, float] = {}
    for name, go in (("apply", None), ("switch", staged_then_switch)):
        took: list[float] = []
        for _ in range(2):
            scenario.fresh()
            assert run_child(scenario.apply, go=go, took=took) == "finished"
        window[name] = min(took)
    rng = random.Random(0xBEEF)
    seen: dict[tuple[str, str | None], int] = {}

    def killed() -> int:
        return sum(n for (outcome, _), n in seen.items() if outcome == "killed")

    # At least 20 rounds, and more (up to 40) until 10 kills, 3 of them while switching,
    # landed: on a busy machine a short switch escapes more kills than the window expects.
    for rnd in range(40):
        if rnd >= 20 and killed() >= 10 and seen.get(("killed", "switching"), 0) >= 3:
            break
        name, go = ("apply", None) if rnd % 2 else ("switch", staged_then_switch)
        old = scenario.fresh()
        took = []
        outcome = run_child(scenario.apply, kill_after=rng.uniform(0, window[name]), go=go,
                            took=took)
        if outcome == "finished":
            window[name] = min(window[name], 0.9 * took[0])
        phase = scenario.journal().pending()
        key = (outcome, phase)
        seen[key] = seen.get(key, 0) + 1
        check_after_recovery(scenario, old, phase)
    assert killed() >= 10, seen
    assert seen.get(("killed", "switching"), 0) >= 3, seen


class Crash(BaseException):
    """Raised by a hook to stop a run in-process the way a kill would: apply() rolls back
    on Exception only, so this leaves the journal as a kill does (used to count steps)."""


def recovery_points(labels: list[str], rng: random.Random, k: int) -> list[int]:
    """Kill points in a recovery of len(labels) steps: its first and last three (the
    terminal phase and the cleanup) and k more."""
    n = len(labels)
    fixed = {1, 2, n - 2, n - 1, n} & set(range(1, n + 1))
    rest = sorted(set(range(1, n + 1)) - fixed)
    return sorted(fixed | set(rng.sample(rest, min(k, len(rest)))))


def switch_window(scenario: Scenario, hook) -> tuple[int, int]:
    labels, count = counting_hook()
    scenario.fresh()
    hook(count)
    scenario.apply()
    hook(None)
    return labels.index("phase switching") + 1, labels.index("phase done") + 1


@KILLS
def test_killed_during_recovery_then_recovered_again(scenario, hook):
    """A switch killed mid-way; its roll-forward killed at its own steps; a last recovery
    still ends in exactly the new tree."""
    switching, done = switch_window(scenario, hook)
    rng = random.Random(0xF00D)
    rounds = 0
    for kill_at in (switching + 2, (switching + done) // 2, done - 2):
        scenario.fresh()  # count the recovery's steps for this kill point, in-process
        hook(fail_at(kill_at, Crash()))
        with pytest.raises(Crash):
            scenario.apply()
        labels, count = counting_hook()
        hook(count)
        assert scenario.journal().recover() == "completed"
        hook(None)
        for m in recovery_points(labels, rng, 1):
            old = scenario.fresh()

            def apply_child(k: int = kill_at) -> None:
                crashpoints.crash_hook = die_at(k)
                scenario.apply()

            def recover_child(m: int = m) -> None:
                crashpoints.crash_hook = die_at(m)
                scenario.journal().recover()

            assert run_child(apply_child) == "killed"
            assert scenario.journal().pending() == "switching"
            assert run_child(recover_child) == "killed"
            phase = scenario.journal().pending()
            assert phase in ("switching", "done"), (m, labels[m - 1], phase)
            check_after_recovery(scenario, old, phase)
            rounds += 1
    assert rounds == 18


@KILLS
def test_killed_during_rollback_then_rollback_finishes(scenario, hook):
    """The switch fails (disk full) and its rollback is killed at its own steps: recovery
    finishes the rollback (never a roll forward) and the old tree is back exactly."""
    switching, done = switch_window(scenario, hook)
    rng = random.Random(0xCAFE)
    rounds = 0
    for fail in (switching + 2, (switching + done) // 2, done - 2):
        scenario.fresh()  # count the rollback's steps for this failure point
        labels, count = counting_hook()
        failing = fail_at(fail, OSError(errno.ENOSPC, "No space left on device"))

        def count_and_fail(label: str, count: Callable = count,
                           failing: Callable = failing) -> None:
            count(label)
            failing(label)

        hook(count_and_fail)
        with pytest.raises(OSError):
            scenario.apply()
        hook(None)
        rollback_labels = labels[fail:]
        assert rollback_labels[0] == "phase rolling-back", rollback_labels[:3]
        for m in recovery_points(rollback_labels, rng, 1):
            old = scenario.fresh()

            def child(fail: int = fail, die: int = fail + m) -> None:
                calls = [0]

                def hook_fn(_label: str) -> None:
                    calls[0] += 1
                    if calls[0] == fail:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    if calls[0] == die:
                        os._exit(9)

                crashpoints.crash_hook = hook_fn
                scenario.apply()

            assert run_child(child) == "killed"
            phase = scenario.journal().pending()
            assert phase in ("switching", "rolling-back", "rolled-back"), phase
            # killed before "rolling-back" was on disk: the switch rolls forward instead
            check_after_recovery(scenario, old, phase)
            rounds += 1
    assert rounds == 18


def test_journal_of_the_previous_format_is_still_recovered(scenario, hook):
    """A switch interrupted under an older agent (journal version 1: positional rows) is
    rolled forward by this one."""
    switching, done = switch_window(scenario, hook)
    scenario.fresh()
    hook(fail_at((switching + done) // 2, Crash()))
    with pytest.raises(Crash):
        scenario.apply()
    hook(None)
    path = scenario.work / "journal"
    journal = Journal.decode(path.read_bytes())
    assert journal.ops and any(op.new is not None for op in journal.ops)

    def meta(m: Meta | None) -> list | None:
        return None if m is None else [m.mode, m.uid, m.gid, m.atime_ns, m.mtime_ns,
                                       dict(m.xattrs)]

    path.write_bytes(msgpack.packb({
        "v": 1, "owner": journal.owner, "warnings": journal.warnings,
        "times": [[p, a, m] for p, (a, m) in journal.times.items()],
        "ops": [[op.n, op.kind.value, op.path, op.action.value, op.is_dir, op.size,
                 meta(op.new), meta(op.old)] for op in journal.ops]}, use_bin_type=True))
    assert Journal.decode(path.read_bytes()) == journal
    assert scenario.journal().recover() == "completed"
    assert_same(comparable(snapshot(scenario.root), scenario.loose), scenario.want_new)
    assert_clean(scenario.work)


def test_unreadable_journal_is_one_clear_error(scenario, hook):
    switching, _ = switch_window(scenario, hook)
    scenario.fresh()
    hook(fail_at(switching + 1, Crash()))
    with pytest.raises(Crash):
        scenario.apply()
    hook(None)
    (scenario.work / "journal").write_bytes(msgpack.packb({"v": 2, "ops": [{"kind": "x"}]}))
    with pytest.raises(StrataError, match="journal .* is unreadable"):
        scenario.journal().recover()
    assert scenario.journal().pending() is Phase.SWITCHING  # nothing was given up

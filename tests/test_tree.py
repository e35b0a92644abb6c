"""Filesystem side: exclude patterns, scan fidelity, restore round trips and restore safety."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import traceback
from pathlib import Path

import pytest

from strata.errors import UnsafePath
from strata.model.entry import Entry, EntryType
from strata.tree.excludes import ExcludeMatcher
from strata.tree.order import path_key
from strata.tree.scan import open_path, scan_tree
from strata.tree.writer import TreeWriter, validate_path

IS_ROOT = os.geteuid() == 0
HAS_SETFACL = shutil.which("setfacl") is not None
MTIME = 1_234_567_890_123_456_789
DEEP_NAME_LEN = 200
DEEP_LEVELS = 25  # 25 * 201 bytes: well past PATH_MAX (4096)


# -- helpers ------------------------------------------------------------------------------


def scan(root, **kw) -> dict[bytes, Entry]:
    return {e.path: e for e, _ in scan_tree(root, **kw)}


def read_chunks(abs_path: bytes, size: int = 65536):
    fd = open_path(abs_path)
    try:
        while chunk := os.read(fd, size):
            yield chunk
    finally:
        os.close(fd)


def restore(src, dst, **kw) -> TreeWriter:
    with TreeWriter(dst, **kw) as w:
        for entry, abs_path in scan_tree(src):
            data = read_chunks(abs_path) if entry.type is EntryType.FILE else None
            w.write(entry, data)
    return w


COMPARED = ("type", "mode", "uid", "gid", "mtime_ns", "size", "link_target", "rdev", "xattrs",
            "sparse")


def assert_same_tree(a: dict[bytes, Entry], b: dict[bytes, Entry]) -> None:
    assert list(a) == list(b)
    for path, ea in a.items():
        eb = b[path]
        for f in COMPARED:
            assert getattr(ea, f) == getattr(eb, f), (path, f, getattr(ea, f), getattr(eb, f))


def setfacl(*args: str) -> None:
    subprocess.run(["setfacl", *args], check=True)


def make_deep(root: Path) -> bytes:
    """A file whose path relative to `root` is longer than PATH_MAX; returns that path."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    rel = []
    try:
        for i in range(DEEP_LEVELS):
            name = (b"d%02d" % i).ljust(DEEP_NAME_LEN, b"x")
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            rel.append(name)
        ffd = os.open(b"leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(ffd, b"deep data")
        os.setxattr(ffd, b"user.deep", b"yes")
        os.utime(ffd, ns=(MTIME, MTIME))
        os.close(ffd)
    finally:
        os.close(fd)
    return b"/".join([*rel, b"leaf"])


def try_mknod(path: Path, kind: int, dev: int) -> bool:
    try:
        os.mknod(path, kind | 0o640, dev)
        return True
    except PermissionError:
        return False


def build_source(root: Path) -> dict[str, object]:
    """A tree with every entry type and the metadata corner cases; returns what it made."""
    made: dict[str, object] = {}
    root.mkdir()
    (root / "regular").write_bytes(b"hello world\n" * 1000)
    (root / "empty").write_bytes(b"")
    (root / "emptydir").mkdir()
    with open(root / "sparse", "wb") as f:
        f.write(b"head")
        f.truncate(8 << 20)
    with open(root / "allhole", "wb") as f:
        f.truncate(3 << 20)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "deeper" / "f").write_bytes(b"x")
    os.symlink("../regular", root / "sub" / "link")
    os.symlink("nowhere/at/all", root / "dangling")
    (root / "hl1").write_bytes(b"shared inode")
    os.link(root / "hl1", root / "sub" / "hl2")
    os.link(root / "hl1", root / "sub" / "deeper" / "hl3")
    os.mkfifo(root / "fifo", 0o640)
    (root / "suid").write_bytes(b"#!/bin/sh\n")
    (root / "sticky").mkdir()
    (root / "sgid").mkdir()
    (root / "readonly").mkdir()
    (root / "readonly" / "inside").write_bytes(b"ro")
    (root / "caf\udce9").write_bytes(b"latin-1 name")  # b"caf\xe9" on disk
    (root / ("n" * 255)).write_bytes(b"long name")
    os.setxattr(root / "regular", b"user.note", b"hello")
    os.setxattr(root / "sub", b"user.dirnote", b"\x00\xffbinary")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "sock"))
    made["deep"] = make_deep(root)
    if IS_ROOT:
        made["chardev"] = try_mknod(root / "chardev", stat.S_IFCHR, os.makedev(1, 3))
        made["blockdev"] = try_mknod(root / "blockdev", stat.S_IFBLK, os.makedev(7, 0))
        os.chown(root / "regular", 1234, 5678)
        os.chown(root / "suid", 1234, 5678)
        os.lchown(root / "sub" / "link", 4321, 8765)
        os.chown(root / "sub", 1111, 2222)
        os.setxattr(root / "regular", b"trusted.t", b"root only")
        os.setxattr(root / "sub" / "link", b"trusted.onlink", b"v", follow_symlinks=False)
        # vfs_cap_data v2 granting CAP_NET_RAW: the kernel drops it on chown.
        cap = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
        try:
            os.setxattr(root / "suid", b"security.capability", cap)
            made["cap"] = True
        except OSError:
            made["cap"] = False
    if HAS_SETFACL:
        setfacl("-m", "u:1234:rwx,g:99:r", str(root / "regular"))
        (root / "acldir").mkdir()
        (root / "acldir" / "before").write_bytes(b"no acl")
        setfacl("-d", "-m", "u:1234:rx", str(root / "acldir"))
        (root / "acldir" / "inherits").write_bytes(b"inherited acl")
        (root / "acldir" / "plain").write_bytes(b"acl removed")
        (root / "acldir" / "subdir").mkdir()
        (root / "acldir" / "plainsub").mkdir()
        os.mkfifo(root / "acldir" / "fifo")
        setfacl("-b", str(root / "acldir" / "plain"))
        setfacl("-b", str(root / "acldir" / "plainsub"))
    os.chmod(root / "suid", 0o4755)
    os.chmod(root / "sticky", 0o1777)
    os.chmod(root / "sgid", 0o2775)
    for p in (root / "regular", root / "fifo", root / "emptydir", root / "caf\udce9"):
        os.utime(p, ns=(MTIME, MTIME))
    os.utime(root / "sub" / "link", ns=(MTIME - 1, MTIME - 1), follow_symlinks=False)
    os.utime(root / "sub", ns=(MTIME + 7, MTIME + 7))
    os.chmod(root / "readonly", 0o555)
    return made


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    root = tmp_path / "src"
    made = build_source(root)
    yield root, made
    os.chmod(root / "readonly", 0o755)


# -- excludes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "is_dir", "expected"),
    [
        ("*.tmp", b"a.tmp", False, True),
        ("*.tmp", b"x/y/a.tmp", False, True),
        ("*.tmp", b"a.tmp/inner", False, False),
        ("*.tmp", b"a.tmpx", False, False),
        ("__pycache__", b"pkg/__pycache__", True, True),
        ("__pycache__", b"pkg/__pycache__x", True, False),
        ("/var/cache", b"var/cache", True, True),
        ("/var/cache", b"srv/var/cache", True, False),
        ("/home/*/.cache", b"home/ann/.cache", True, True),
        ("/home/*/.cache", b"x/home/ann/.cache", True, False),
        (".git/objects", b".git/objects", True, True),
        (".git/objects", b"src/proj/.git/objects", True, True),
        (".git/objects", b"src/proj.git/objects", True, False),
        (".git/objects", b".git/objects/ab", False, False),
        ("build/", b"proj/build", True, True),
        ("build/", b"proj/build", False, False),
        ("/tmp/", b"tmp", True, True),
        ("/tmp/", b"tmp", False, False),
        ("a/b/", b"x/a/b", True, True),
        ("a/b/", b"x/a/b", False, False),
        ("caf\udce9", b"dir/caf\xe9", False, True),
        ("*.log", b"dir/weird\nname.log", False, True),
        ("/lo?s/*", b"logs/a/b", False, True),  # fnmatch: '*' also spans '/'
    ],
)
def test_exclude_matcher(pattern, path, is_dir, expected):
    assert ExcludeMatcher([pattern]).excluded(path, is_dir) is expected


def test_exclude_matcher_many_patterns_and_empty():
    m = ExcludeMatcher(["*.o", "/proc/", "node_modules/", "docs/*.pdf"])
    assert m.excluded(b"src/a.o", False)
    assert m.excluded(b"proc", True)
    assert not m.excluded(b"proc", False)
    assert m.excluded(b"web/node_modules", True)
    assert m.excluded(b"x/docs/a.pdf", False)
    assert not m.excluded(b"src/a.c", False)
    assert not ExcludeMatcher([]).excluded(b"anything", True)
    with pytest.raises(ValueError):
        ExcludeMatcher(["/"])


def test_scan_skips_excluded_subtrees(tmp_path):
    (tmp_path / "keep" / "cache").mkdir(parents=True)
    (tmp_path / "keep" / "cache" / "big").write_bytes(b"x")
    (tmp_path / "keep" / "a.tmp").write_bytes(b"x")
    (tmp_path / "keep" / "a.txt").write_bytes(b"x")
    (tmp_path / "var" / "cache").mkdir(parents=True)
    (tmp_path / "var" / "cache" / "f").write_bytes(b"x")
    got = scan(tmp_path, excludes=ExcludeMatcher(["*.tmp", "/var/cache", "cache/"]))
    assert list(got) == [b"keep", b"keep/a.txt", b"var"]


# -- order --------------------------------------------------------------------------------


def test_path_key_puts_subtree_right_after_its_directory():
    paths = [b"a-b", b"a/z", b"a", b"a/b/c", b"a.txt", b"b", b"a/b"]
    assert sorted(paths, key=path_key) == [b"a", b"a/b", b"a/b/c", b"a/z", b"a-b", b"a.txt",
                                           b"b"]


# -- scan ---------------------------------------------------------------------------------


def test_scan_fidelity(source):
    root, made = source
    errors: list[str] = []
    got = scan(root, errors=errors)
    assert errors == []
    assert list(got) == sorted(got, key=path_key)
    assert b"sock" not in got

    reg = got[b"regular"]
    st = os.lstat(root / "regular")
    assert reg.type is EntryType.FILE
    assert (reg.size, reg.mtime_ns, reg.inode, reg.dev, reg.ctime_ns) == (
        12000, MTIME, st.st_ino, st.st_dev, st.st_ctime_ns)
    assert reg.xattrs[b"user.note"] == b"hello"
    assert not reg.sparse
    assert got[b"empty"].type is EntryType.FILE and got[b"empty"].size == 0
    assert got[b"emptydir"].type is EntryType.DIR and got[b"emptydir"].mtime_ns == MTIME
    assert got[b"sparse"].sparse and got[b"sparse"].size == 8 << 20
    assert got[b"allhole"].sparse
    assert got[b"sub"].xattrs[b"user.dirnote"] == b"\x00\xffbinary"
    assert got[b"sub"].size == 0

    link = got[b"sub/link"]
    assert (link.type, link.link_target, link.mtime_ns) == (EntryType.SYMLINK, b"../regular",
                                                             MTIME - 1)
    assert got[b"dangling"].link_target == b"nowhere/at/all"

    assert got[b"hl1"].type is EntryType.FILE
    for name in (b"sub/hl2", b"sub/deeper/hl3"):
        assert got[name].type is EntryType.HARDLINK
        assert got[name].link_target == b"hl1"
        assert got[name].size == len(b"shared inode")
        assert got[name].chunks == []

    assert got[b"fifo"].type is EntryType.FIFO and got[b"fifo"].mode == 0o640
    assert got[b"suid"].mode == 0o4755
    assert got[b"sticky"].mode == 0o1777
    assert got[b"sgid"].mode == 0o2775
    assert got[b"readonly"].mode == 0o555
    assert got[b"caf\xe9"].mtime_ns == MTIME
    assert got[b"n" * 255].size == len(b"long name")

    deep = got[made["deep"]]
    assert len(made["deep"]) > 4096
    assert deep.size == len(b"deep data") and deep.xattrs == {b"user.deep": b"yes"}

    if IS_ROOT:
        assert (reg.uid, reg.gid) == (1234, 5678)
        assert (link.uid, link.gid) == (4321, 8765)
        assert reg.xattrs[b"trusted.t"] == b"root only"
        assert link.xattrs == {b"trusted.onlink": b"v"}
        if made["chardev"]:
            assert got[b"chardev"].type is EntryType.CHARDEV
            assert got[b"chardev"].rdev == os.makedev(1, 3)
        if made["blockdev"]:
            assert got[b"blockdev"].type is EntryType.BLOCKDEV
            assert got[b"blockdev"].rdev == os.makedev(7, 0)
    if HAS_SETFACL:
        assert b"system.posix_acl_access" in reg.xattrs
        assert b"system.posix_acl_default" in got[b"acldir"].xattrs
        assert b"system.posix_acl_access" in got[b"acldir/inherits"].xattrs
        assert b"system.posix_acl_access" not in got[b"acldir/before"].xattrs


def test_scan_yields_absolute_paths_readable_with_open_path(source):
    root, made = source
    for entry, abs_path in scan_tree(str(root)):
        assert abs_path == os.fsencode(root) + b"/" + entry.path
    assert b"".join(read_chunks(os.fsencode(root) + b"/" + made["deep"])) == b"deep data"


def test_scan_reports_paths_that_vanish(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").write_bytes(b"x")
    errors: list[str] = []
    it = scan_tree(tmp_path, errors=errors)
    first, _ = next(it)
    assert first.path == b"a"
    os.unlink(tmp_path / "b")  # listed already, not yet stat'ed
    assert list(it) == []
    assert len(errors) == 1 and errors[0].startswith("b: ")


def test_scan_does_not_follow_symlinked_dirs(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_bytes(b"x")
    os.symlink("real", tmp_path / "alias")
    assert list(scan(tmp_path)) == [b"alias", b"real", b"real/f"]


# -- round trip ---------------------------------------------------------------------------


def test_round_trip_restores_every_field(source, tmp_path):
    root, made = source
    dst = tmp_path / "dst"
    w = restore(root, dst)
    try:
        before = scan(root)
        after = scan(dst)
        assert_same_tree(before, after)
        assert w.warnings == []

        ino = {os.lstat(dst / p).st_ino for p in ("hl1", "sub/hl2", "sub/deeper/hl3")}
        assert len(ino) == 1
        assert os.lstat(dst / "hl1").st_nlink == 3
        for name in ("sparse", "allhole"):
            st = os.lstat(dst / name)
            assert st.st_blocks * 512 < st.st_size
        assert os.lstat(dst / "allhole").st_blocks == 0
        assert (dst / "sparse").read_bytes() == (root / "sparse").read_bytes()
        assert (dst / "regular").read_bytes() == (root / "regular").read_bytes()
        assert (dst / "readonly" / "inside").read_bytes() == b"ro"
        if IS_ROOT and made.get("cap"):
            assert b"security.capability" in after[b"suid"].xattrs
            assert after[b"suid"].mode == 0o4755 and after[b"suid"].uid == 1234
    finally:
        if (dst / "readonly").exists():
            os.chmod(dst / "readonly", 0o755)


def test_round_trip_over_existing_tree_replaces_and_syncs(source, tmp_path):
    root, _ = source
    dst = tmp_path / "dst"
    (dst / "sub").mkdir(parents=True)
    os.setxattr(dst / "sub", b"user.stale", b"old")
    (dst / "regular").mkdir()  # a directory where the snapshot has a file
    (dst / "regular" / "junk").write_bytes(b"junk")
    (dst / "emptydir").write_bytes(b"a file where the snapshot has a directory")
    os.symlink("/", dst / "hl1")
    (dst / "extra").write_bytes(b"not in the snapshot: left alone")
    try:
        restore(root, dst)
        after = scan(dst)
        assert after.pop(b"extra").type is EntryType.FILE
        assert_same_tree(scan(root), after)
    finally:
        for d in (dst, root):
            if (d / "readonly").exists():
                os.chmod(d / "readonly", 0o755)


def test_writer_sparse_chunks_become_holes(tmp_path):
    mib = 1 << 20
    chunks = [bytes(mib), b"data" * 1024, bytes(mib), bytes(mib)]
    size = sum(map(len, chunks))
    with TreeWriter(tmp_path / "t") as w:
        w.write(Entry(b"s", EntryType.FILE, size=size, sparse=True), chunks)
        w.write(Entry(b"dense", EntryType.FILE, size=size), chunks)
    st = os.lstat(tmp_path / "t" / "s")
    assert st.st_size == size and st.st_blocks * 512 <= 64 * 1024
    assert (tmp_path / "t" / "s").read_bytes() == b"".join(chunks)
    assert os.lstat(tmp_path / "t" / "dense").st_blocks * 512 >= size


def test_writer_devices_need_root(tmp_path):
    w = TreeWriter(tmp_path / "t")
    w._is_root = False
    w.write(Entry(b"null", EntryType.CHARDEV, rdev=os.makedev(1, 3)))
    w.close()
    assert not os.path.lexists(tmp_path / "t" / "null")
    assert w.warnings and "needs root" in w.warnings[0]


def test_writer_creates_missing_parents(tmp_path):
    with TreeWriter(tmp_path / "t", restore_owner=False) as w:
        w.write(Entry(b"a/b/c", EntryType.FILE, size=2), [b"hi"])
    assert (tmp_path / "t" / "a" / "b" / "c").read_bytes() == b"hi"


def test_writer_hardlink_to_missing_name_warns(tmp_path):
    with TreeWriter(tmp_path / "t") as w:
        w.write(Entry(b"h", EntryType.HARDLINK, link_target=b"never/written"))
    assert len(w.warnings) == 1 and "never/written" in w.warnings[0]


def test_writer_fd_cache_survives_wide_and_deep_trees(tmp_path):
    entries = []
    for i in range(100):
        entries.append(Entry(b"d%03d" % i, EntryType.DIR, mode=0o755))
        entries.append(Entry(b"d%03d/f" % i, EntryType.FILE, size=1))
    deep = b"/".join(b"x%d" % i for i in range(150))
    # Other tests of the same process may hold descriptors (catalog pools, test servers):
    # what counts is how many the writer leaves open beyond those.
    open_before = len(os.listdir("/proc/self/fd"))
    with TreeWriter(tmp_path / "t") as w:
        for e in entries:
            w.write(e, [b"z"] if e.type is EntryType.FILE else None)
        w.write(Entry(deep + b"/leaf", EntryType.FILE, size=1), [b"q"])
        w.write(Entry(b"h", EntryType.HARDLINK, link_target=deep + b"/leaf"))
        w.write(Entry(b"d000/h", EntryType.HARDLINK, link_target=b"d099/f"))
    assert (tmp_path / "t" / "h").read_bytes() == b"q"
    assert os.lstat(tmp_path / "t" / "d000" / "h").st_ino == os.lstat(
        tmp_path / "t" / "d099" / "f").st_ino
    assert len(os.listdir("/proc/self/fd")) - open_before < 64


# -- safety -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [b"../evil", b"/abs/evil", b"a/../../evil", b"", b"a//b", b"a/./b", b"x\x00y", b".",
     b"a/", b"..", "str/path"],
)
def test_validate_path_rejects(bad):
    with pytest.raises(UnsafePath):
        validate_path(bad)


@pytest.mark.parametrize("good", [b"a", b"a/b/c", b"...", b"a/.hidden", b"caf\xe9", b"a..b"])
def test_validate_path_accepts(good):
    validate_path(good)


def _plain(path: bytes) -> Entry:
    return Entry(path, EntryType.FILE, size=4)


SAFETY_CASES = {
    "dotdot": lambda out: [_plain(b"../evil")],
    "absolute": lambda out: [_plain(os.fsencode(out) + b"/evil")],
    "dotdot-inside": lambda out: [_plain(b"a/../../evil")],
    "empty": lambda out: [_plain(b"")],
    "empty-component": lambda out: [_plain(b"a//b")],
    "dot-component": lambda out: [_plain(b"a/./b")],
    "nul": lambda out: [_plain(b"x\x00y")],
    "symlink-redirect": lambda out: [
        Entry(b"a", EntryType.SYMLINK, link_target=os.fsencode(out)), _plain(b"a/evil")],
    "symlink-redirect-dir": lambda out: [
        Entry(b"a", EntryType.SYMLINK, link_target=os.fsencode(out)),
        Entry(b"a/evil", EntryType.DIR)],
    "symlink-redirect-relative": lambda out: [
        Entry(b"a", EntryType.SYMLINK, link_target=b"../outside"), _plain(b"a/evil")],
    "hardlink-escape": lambda out: [
        Entry(b"h", EntryType.HARDLINK, link_target=b"../../etc/passwd")],
    "hardlink-through-symlink": lambda out: [
        Entry(b"s", EntryType.SYMLINK, link_target=os.fsencode(out)),
        Entry(b"h", EntryType.HARDLINK, link_target=b"s/secret")],
    "pre-existing-symlink": "pre",
}


@pytest.mark.parametrize("case", list(SAFETY_CASES))
def test_restore_never_writes_outside_target(tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    target = tmp_path / "target"
    target.mkdir()
    if case == "pre-existing-symlink":
        os.symlink(outside, target / "pre")
        entries = [_plain(b"pre/x")]
    else:
        entries = SAFETY_CASES[case](outside)
    with TreeWriter(target) as w:
        for e in entries[:-1]:
            w.write(e)
        with pytest.raises(UnsafePath):
            w.write(entries[-1], [b"evil"])
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_bytes() == b"secret"
    assert os.lstat(outside / "secret").st_nlink == 1
    assert sorted(os.listdir(tmp_path)) == ["outside", "target"]
    assert not os.path.lexists(os.fsencode(outside) + b"/evil")


def test_unsafe_path_message_names_the_path(tmp_path):
    (tmp_path / "t").mkdir()
    os.symlink("/", tmp_path / "t" / "pre")
    with TreeWriter(tmp_path / "t") as w, pytest.raises(UnsafePath, match="pre/x.*symlink"):
        w.write(_plain(b"pre/x"), [b"evil"])


def test_existing_leaf_symlinks_and_hardlinks_are_replaced_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (outside / "linked").write_bytes(b"linked")
    target = tmp_path / "target"
    target.mkdir()
    os.symlink(outside / "secret", target / "f")
    os.symlink(outside, target / "d")
    os.symlink(outside / "secret", target / "fifo")
    os.link(outside / "linked", target / "hl")
    secret_mode = os.stat(outside / "secret").st_mode
    with TreeWriter(target) as w:
        w.write(Entry(b"f", EntryType.FILE, size=4, mode=0o600), [b"evil"])
        w.write(Entry(b"d", EntryType.DIR, mode=0o700))
        w.write(Entry(b"d/x", EntryType.FILE, size=4), [b"evil"])
        w.write(Entry(b"fifo", EntryType.FIFO, mode=0o600))
        w.write(Entry(b"hl", EntryType.FILE, size=4), [b"evil"])
    assert (outside / "secret").read_bytes() == b"secret"
    assert (outside / "linked").read_bytes() == b"linked"
    assert sorted(os.listdir(outside)) == ["linked", "secret"]
    assert os.stat(outside / "secret").st_mode == secret_mode
    assert (target / "f").read_bytes() == b"evil" and not os.path.islink(target / "f")
    assert os.path.isdir(target / "d") and not os.path.islink(target / "d")
    assert stat.S_ISFIFO(os.lstat(target / "fifo").st_mode)
    assert os.lstat(target / "hl").st_nlink == 1


def test_device_node_when_root(tmp_path):
    if not IS_ROOT:
        pytest.skip("needs root")
    with TreeWriter(tmp_path / "t") as w:
        try:
            w.write(Entry(b"null", EntryType.CHARDEV, mode=0o666, rdev=os.makedev(1, 3)))
        except OSError as e:  # pragma: no cover - container without CAP_MKNOD
            if e.errno == errno.EPERM:
                pytest.skip("mknod not permitted")
            raise
    if w.warnings:
        pytest.skip(w.warnings[0])
    st = os.lstat(tmp_path / "t" / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o666


def _restore_locked_dirs(target: str) -> None:
    entries = []
    for i in range(80):  # more directories than the writer's fd cache holds
        entries += [
            Entry(b"d%02d" % i, EntryType.DIR, mode=0o000),
            Entry(b"d%02d/inner" % i, EntryType.DIR, mode=0o500),
            Entry(b"d%02d/inner/f" % i, EntryType.FILE, mode=0o400, size=1),
        ]
    with TreeWriter(target) as w:
        for e in entries:
            w.write(e, [b"x"] if e.type is EntryType.FILE else None)


def test_finish_sets_modes_deepest_first_so_unsearchable_dirs_work_unprivileged(tmp_path):
    if not IS_ROOT:
        target = tmp_path / "t"
        try:
            _restore_locked_dirs(str(target))
        finally:
            for p in target.glob("d*"):
                os.chmod(p, 0o700)
        return
    # As root permissions never bite, so do the restore as nobody in a child process
    # (in /tmp: pytest's own tmp dirs are not searchable by other users).
    base = Path(tempfile.mkdtemp(prefix="strata-test-", dir="/tmp"))
    try:
        os.chmod(base, 0o777)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                _restore_locked_dirs(str(base / "t"))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0
        assert stat.S_IMODE(os.lstat(base / "t" / "d79").st_mode) == 0o000
        assert stat.S_IMODE(os.lstat(base / "t" / "d00" / "inner").st_mode) == 0o500
        assert (base / "t" / "d00" / "inner" / "f").read_bytes() == b"x"
    finally:
        shutil.rmtree(base)

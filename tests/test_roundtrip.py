"""Backup then restore gives back exactly the tree; dedup, diff, stats, forget and prune."""

from __future__ import annotations

import os
import random
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strata.engine import prune as prune_mod
from strata.engine.backup import backup
from strata.engine.restore import restore
from strata.engine.stats import store_stats
from strata.store.repository import Store

IS_ROOT = os.geteuid() == 0

# -- random trees ---------------------------------------------------------------------------

_plain_names = st.text(alphabet="abcxyzABC019-_.~ ", min_size=1, max_size=10).map(str.encode)
_byte_names = st.binary(min_size=1, max_size=12).map(
    lambda b: b.replace(b"/", b"_").replace(b"\0", b"\xff"))  # non-UTF-8 welcome
names = st.one_of(_plain_names, _byte_names).filter(lambda b: b not in (b".", b".."))
mtimes = st.integers(0, 4_102_444_800 * 10**9)  # 1970 .. 2100, nanoseconds
owners = st.sampled_from([(0, 0), (1000, 1000), (65534, 65534), (123456, 7), (1, 0)]) \
    if IS_ROOT else st.just((os.geteuid(), os.getegid()))
file_modes = st.one_of(st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o2755, 0o1644,
                                        0o6711, 0o000, 0o444]), st.integers(0, 0o7777))
dir_modes = st.one_of(st.sampled_from([0o755, 0o700, 0o1777, 0o2775, 0o555]),
                      st.integers(0, 0o7777).map(lambda m: m | (0o700 if not IS_ROOT else 0)))


def _random_bytes(seed: int, size: int, compressible: bool) -> bytes:
    rng = random.Random(seed)
    if compressible:
        return (rng.randbytes(64) * (size // 64 + 1))[:size]
    return rng.randbytes(size)


contents = st.one_of(
    st.just(b""),
    st.binary(max_size=300),
    st.builds(_random_bytes, st.integers(0, 1 << 16), st.integers(1, 70_000), st.booleans()),
    # multi-chunk: the chunker's average is 64 KiB and its maximum 256 KiB
    st.builds(_random_bytes, st.integers(0, 1 << 16), st.integers(200_000, 600_000),
              st.booleans()),
)
xattr_sets = st.one_of(st.just({}), st.dictionaries(
    st.binary(min_size=1, max_size=8).map(lambda b: "user." + b.hex()),
    st.binary(max_size=64), max_size=3))
link_targets = st.one_of(
    st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\0", b"\x01")),
    st.sampled_from([b"../up", b"/absolute/elsewhere", b"sibling", b"."]),
)


@st.composite
def tree_plans(draw) -> list[tuple]:
    """Operations that build a tree: dirs first (parents before children), then the rest."""
    dirs, files, used, ops = [b""], [], set(), []

    def fresh() -> bytes | None:
        parent = draw(st.sampled_from(dirs))
        path = parent + b"/" + draw(names) if parent else draw(names)
        if path in used:
            return None
        used.add(path)
        return path

    for _ in range(draw(st.integers(1, 5))):
        if p := fresh():
            dirs.append(p)
            ops.append(("dir", p, draw(dir_modes), draw(owners), draw(mtimes),
                        draw(xattr_sets)))
    for _ in range(draw(st.integers(1, 8))):
        if p := fresh():
            files.append(p)
            ops.append(("file", p, draw(contents), draw(file_modes), draw(owners), draw(mtimes),
                        draw(xattr_sets)))
    for _ in range(draw(st.integers(0, 3))):
        if p := fresh():
            ops.append(("symlink", p, draw(link_targets), draw(owners), draw(mtimes)))
    for _ in range(draw(st.integers(0, 1))):
        if p := fresh():
            ops.append(("fifo", p, None, draw(file_modes), draw(owners), draw(mtimes), {}))
    if files:
        for _ in range(draw(st.integers(0, 3))):
            if p := fresh():
                ops.append(("hardlink", p, draw(st.sampled_from(files))))
    return ops


def build(root: Path, ops: list[tuple]) -> None:
    base = os.fsencode(root)
    root.mkdir()

    def at(p: bytes) -> bytes:
        return os.path.join(base, p)

    for op in ops:
        kind, path = op[0], at(op[1])
        if kind == "dir":
            os.mkdir(path)
        elif kind == "file":
            with open(path, "wb") as f:
                f.write(op[2])
        elif kind == "symlink":
            os.symlink(op[2], path)
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            os.link(at(op[2]), path)
    # Metadata once nothing more is created (creating an entry touches its parent's mtime).
    # chown before chmod: chown clears setuid/setgid.
    for op in ops:
        kind, path = op[0], at(op[1])
        if kind in ("file", "fifo"):
            _, _, _, mode, (uid, gid), mtime, xattrs = op
            os.chown(path, uid, gid)
            for key, value in xattrs.items():
                os.setxattr(path, key, value)
            os.chmod(path, mode)
            os.utime(path, ns=(mtime, mtime))
        elif kind == "symlink":
            _, _, _, (uid, gid), mtime = op
            os.lchown(path, uid, gid)
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
        elif kind == "dir":
            _, _, mode, (uid, gid), mtime, xattrs = op
            os.chown(path, uid, gid)
            for key, value in xattrs.items():
                os.setxattr(path, key, value)
            os.chmod(path, mode)
            os.utime(path, ns=(mtime, mtime))


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(ops=tree_plans())
def test_random_trees_round_trip_exactly(ops, tmp_path, trees):
    with tempfile.TemporaryDirectory(dir=tmp_path) as work:
        work = Path(work)
        src = work / "src"
        build(src, ops)
        want = trees.tree_state(src)
        with Store.init(work / "store", pack_size=256 << 10) as store:
            first = backup(store, src)
            assert first.errors == []
            # an unchanged second backup goes through the files cache (parent manifest)
            second = backup(store, src)
            assert second.files_unmodified == second.files == first.files
            assert second.bytes_read == 0
            for n, sid in enumerate((first.snapshot, second.snapshot)):
                out = work / f"out{n}"
                result = restore(store, store.load_snapshot(sid), out, full_metadata=True)
                assert result.errors == [] and result.warnings == []
                trees.assert_same_state(trees.tree_state(out), want)
            # A safe restore (the default) differs only by the setuid/setgid bits of
            # non-directories, each inode's reported once.
            result = restore(store, store.load_snapshot(first.snapshot), work / "safe")
            assert result.errors == [] and result.warnings == []
            safe = {"entries": {p: (e[:1] + (e[1] & ~0o6000,) + e[2:]
                                    if not stat.S_ISDIR(e[0]) else e)
                                for p, e in want["entries"].items()},
                    "hardlinks": want["hardlinks"]}
            trees.assert_same_state(trees.tree_state(work / "safe"), safe)
            group = {p: tuple(g) for g in want["hardlinks"] for p in g}  # one per inode
            setid = {group.get(p, p) for p, e in want["entries"].items()
                     if not stat.S_ISDIR(e[0]) and e[1] & 0o6000}
            assert len(result.withheld) == len(setid), (result.withheld, setid)


# -- dedup ----------------------------------------------------------------------------------


def test_identical_files_are_stored_once_and_unchanged_files_are_not_read(tmp_path):
    size = 3 << 20
    data = random.Random(3).randbytes(size)
    src = tmp_path / "src"
    (src / "other" / "folder").mkdir(parents=True)
    (src / "big-a.bin").write_bytes(data)
    (src / "big-b.bin").write_bytes(data)
    shutil.copy2(src / "big-a.bin", src / "other" / "folder" / "copy.bin")
    (src / "small.txt").write_bytes(b"tiny\n")

    with Store.init(tmp_path / "store", pack_size=256 << 10) as store:
        first = backup(store, src)
        assert first.files == 4 and first.files_new == 4
        assert first.bytes_total == 3 * size + 5
        assert first.bytes_read == 3 * size + 5  # every new file is read once
        # one copy of the data, plus the small file and the (small) manifest
        assert size <= first.bytes_new <= size + 5 + 16_384, first.bytes_new
        assert first.bytes_stored < size * 1.02  # random data: stored raw, not tripled

        again = backup(store, src)
        assert again.bytes_read == 0
        assert again.files_unmodified == again.files == 4
        assert again.files_new == again.files_changed == 0
        assert again.bytes_new == 0 and again.chunks_new == 0

        (src / "small.txt").write_bytes(b"tiny, but changed\n")
        third = backup(store, src)
        assert third.files_changed == 1 and third.files_unmodified == 3
        assert third.bytes_read == len(b"tiny, but changed\n")


# -- diff, stats, forget + prune through the CLI ------------------------------------------


def test_diff_reports_added_removed_modified(cli, tmp_path, trees, new_store, stores):
    src = trees.make_tree(tmp_path / "src", seed=11, files=30, dirs=3)
    store = new_store()
    a = stores.lib_backup(store, src).snapshot

    files = sorted(p for p in src.rglob("*.dat"))
    removed, modified, chmodded = files[0], files[1], files[2]
    removed.unlink()
    modified.write_bytes(modified.read_bytes() + b"one more line\n")
    chmodded.chmod(0o600)
    (src / "dir00" / "brand-new.txt").parent.mkdir(exist_ok=True)
    (src / "dir00" / "brand-new.txt").write_bytes(b"new\n")
    b = stores.lib_backup(store, src).snapshot

    def rel(p: Path) -> str:
        return str(p.relative_to(src))

    doc = cli.json("diff", store, a[:10], b)
    assert doc["from"] == a and doc["to"] == b
    by = {s: sorted(c["path"] for c in doc["changes"] if c["status"] == s) for s in "+-MU"}
    assert by["+"] == ["dir00/brand-new.txt"]
    assert by["-"] == [rel(removed)]
    assert by["M"] == [rel(modified)]
    assert rel(chmodded) in by["U"]
    assert all(rel(p) not in by["U"] for p in (removed, modified) + tuple(files[3:]))
    assert (doc["added"], doc["removed"], doc["modified"]) == (1, 1, 1)
    assert doc["metadata"] == len(by["U"])

    # and back the other way
    back = cli.json("diff", store, b, a)
    assert sorted(c["path"] for c in back["changes"] if c["status"] == "-") == by["+"]
    assert sorted(c["path"] for c in back["changes"] if c["status"] == "+") == by["-"]
    assert cli.json("diff", store, a, a)["changes"] == []


def test_stats_reports_dedup_ratio(cli, tmp_path, trees, new_store, stores):
    src = trees.make_tree(tmp_path / "src", seed=12, files=60, dirs=4)
    store = new_store()
    first = stores.lib_backup(store, src).to_dict()
    s1 = cli.json("stats", store)
    assert s1["snapshots"] == 1 and s1["logical_bytes"] == first["bytes_total"]
    assert 0.95 < s1["dedup_ratio"] <= 1.0  # the manifest adds a little unique data
    assert s1["compression_ratio"] > 1.2  # half of every file is compressible text

    for _ in range(3):  # unchanged: three more snapshots, no new data
        stores.lib_backup(store, src)
    s4 = cli.json("stats", store)
    assert s4["snapshots"] == 4 and s4["logical_bytes"] == 4 * first["bytes_total"]
    assert s4["unique_bytes"] == s1["unique_bytes"] and s4["stored_bytes"] == s1["stored_bytes"]
    assert 3.8 < s4["dedup_ratio"] <= 4.0
    assert s4["space_saving_ratio"] == pytest.approx(
        s4["dedup_ratio"] * s4["compression_ratio"], rel=0.01)


def test_forget_keep_last_then_prune_frees_space(cli, tmp_path, trees, new_store, stores):
    # straight after the backups: with no writer running, prune need not wait for packs to age
    rng = random.Random(13)
    src = trees.make_tree(tmp_path / "src", seed=13, files=40, dirs=3)
    store = new_store()
    for _ in range(4):
        stores.lib_backup(store, src)
        trees.mutate_tree(src, rng, rewrite=15, add=3, remove=3)
    last = stores.lib_backup(store, src).snapshot
    want = trees.tree_state(src)
    with Store.open(store) as s:
        before = store_stats(s)

    doc = cli.json("forget", store, "--keep-last", "1")
    assert [k["id"] for k in doc["keep"]] == [last] and len(doc["remove"]) == 4
    result = cli.json("prune", store)
    assert result["deleted_packs"] + result["repacked_packs"] > 0, result

    after = cli.json("stats", store)
    assert after["snapshots"] == 1
    assert after["stored_bytes"] < before.stored_bytes * 0.7, (before, after)
    assert after["unique_bytes"] < before.unique_bytes
    doc = cli.json("check", store, "--read-data")
    assert doc["ok"] is True and doc["warnings"] == []
    with Store.open(store) as s:
        assert s.snapshot_ids() == [last]
        assert restore(s, s.load_snapshot(last), tmp_path / "out").errors == []
        # nothing is left to do
        plan = prune_mod.plan_prune(s)
        assert plan.delete == [] and plan.repack == []
    trees.assert_same_state(trees.tree_state(tmp_path / "out"), want)

"""The snapshot read API (engine/snapshot_tree.py): what the mount, the browse routes and
the exports all read through."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import pytest

from snapshot_samples import build_sample
from strata.engine.backup import backup
from strata.engine.restore import restore
from strata.engine.snapshot_tree import ROOT_INODE, NotADirectory, NotAFile, SnapshotTree
from strata.errors import CorruptData, PathNotInSnapshot, UnsafePath
from strata.model.entry import Entry, EntryType
from strata.model.ids import content_id
from strata.model.manifest import encode_manifest
from strata.store.repository import Store


def tree_state_of(tree: SnapshotTree) -> dict[bytes, tuple]:
    """The same facts conftest.tree_state takes from a real tree, read through the API."""
    out: dict[bytes, tuple] = {}
    for rel, ino in tree.walk():
        ino = tree.link_of(ino) or ino
        a = tree.attr(ino)
        extra: object = None
        if a.type is EntryType.FILE:
            extra = b"".join(tree.iter_content(ino))
        elif a.type is EntryType.SYMLINK:
            extra = tree.readlink(ino)
        out[rel] = (stat.S_IFMT(a.st_mode), a.mode, a.mtime_ns,
                    a.size if a.type is EntryType.FILE else None, extra, a.nlink)
    return out


def disk_state(root: Path) -> dict[bytes, tuple]:
    out: dict[bytes, tuple] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, base)
            st = os.lstat(full)
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                extra = Path(os.fsdecode(full)).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(full)
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_mtime_ns,
                        st.st_size if stat.S_ISREG(st.st_mode) else None, extra,
                        st.st_nlink if not stat.S_ISDIR(st.st_mode) else None)
    return out


@pytest.fixture
def sample(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    build_sample(src, random.Random(7))
    store = Store.init(tmp_path / "store", pack_size=256 << 10)
    sid = backup(store, src).snapshot
    snap = store.load_snapshot(sid)
    yield store, snap, src
    store.close()


def test_tree_reads_back_what_a_restore_writes(sample, tmp_path: Path) -> None:
    store, snap, _ = sample
    restore(store, snap, tmp_path / "restored")
    want = disk_state(tmp_path / "restored")
    got = tree_state_of(SnapshotTree.of_store(store, snap))
    # A folder's link count is the filesystem's business; everything else must match.
    got = {k: v if v[0] != stat.S_IFDIR else (*v[:5], None) for k, v in got.items()}
    assert got == want
    assert got[b"docs/hard"][5] == 2  # the hardlink pair is one inode with two names


def test_reading_one_file_fetches_only_its_chunks(sample) -> None:
    store, snap, src = sample
    asked: list[bytes] = []

    def load(ids: list[bytes]):
        asked.extend(ids)
        return store.load_chunks(ids)

    tree = SnapshotTree(b"".join(store.load_chunk(c) for c in snap.manifest_chunk_ids()),
                        load)
    ino = tree.resolve("docs/deep/big.bin")
    own = [cid for cid, _ in tree.entry(ino).chunks]
    assert len(own) > 3  # several chunks, so "only its chunks" means something
    size = tree.attr(ino).size
    data, pos = [], 0
    while pos < size:  # as the kernel reads: 128 KiB at a time
        data.append(tree.read(ino, pos, 128 << 10))
        pos += 128 << 10
    assert b"".join(data) == (src / "docs/deep/big.bin").read_bytes()
    assert set(asked) == set(own) and len(asked) == len(own)
    assert tree.cache.stats.chunks_fetched == len(own)
    assert tree.cache.stats.bytes_fetched == size
    # Read again: all from the cache.
    tree.read(ino, 0, size)
    assert tree.cache.stats.chunks_fetched == len(own)


def test_reads_at_any_offset(sample) -> None:
    store, snap, src = sample
    tree = SnapshotTree.of_store(store, snap, cache_bytes=300_000)  # smaller than the file
    ino = tree.resolve("/docs/deep/big.bin")
    want = (src / "docs/deep/big.bin").read_bytes()
    rng = random.Random(1)
    for _ in range(200):
        off = rng.randrange(len(want) + 10)
        n = rng.choice([1, 17, 4096, 65536, 200_000, 2_000_000])
        assert tree.read(ino, off, n) == want[off:off + n]
    assert tree.cache.size <= 300_000


def test_lookup_listdir_and_errors(sample) -> None:
    store, snap, _ = sample
    tree = SnapshotTree.of_store(store, snap)
    names = [n for n, _ in tree.listdir(ROOT_INODE)]
    assert names == [b"docs", b"empty", b"link", b"script.sh"]
    docs = tree.lookup(ROOT_INODE, b"docs")
    assert docs == tree.resolve("docs") and tree.is_dir(docs)
    assert tree.lookup(docs, b"a.txt") == tree.lookup(docs, b"hard")  # one inode
    assert tree.lookup(docs, b"nope") is None
    assert tree.listdir(tree.resolve("empty")) == []
    with pytest.raises(NotADirectory):
        tree.listdir(tree.resolve("script.sh"))
    with pytest.raises(NotAFile):
        tree.read(docs, 0, 10)
    with pytest.raises(PathNotInSnapshot):
        tree.resolve("docs/missing")
    for bad in ("docs/../script.sh", "docs/./a.txt", "a\0b"):
        with pytest.raises(UnsafePath):
            tree.resolve(bad)


def test_a_damaged_chunk_fails_the_read_not_the_tree(sample) -> None:
    store, snap, _ = sample

    def load(ids: list[bytes]):
        return [CorruptData("chunk damaged") for _ in ids]

    tree = SnapshotTree(b"".join(store.load_chunk(c) for c in snap.manifest_chunk_ids()),
                        load)
    with pytest.raises(CorruptData):
        tree.read(tree.resolve("docs/a.txt"), 0, 10)
    assert tree.attr(tree.resolve("docs/a.txt")).size == 6  # metadata still there


def _manifest(entries: list[Entry]) -> bytes:
    return b"".join(encode_manifest(entries))


def test_crafted_manifest_entries_are_left_out() -> None:
    data = b"secret"
    cid = content_id(data)
    f = Entry(path=b"ok", type=EntryType.FILE, size=6, chunks=[(cid, 6)])
    crafted = [
        Entry(path=b"d", type=EntryType.DIR),
        f,
        Entry(path=b"ok", type=EntryType.FILE),  # listed twice
        Entry(path=b"../escape", type=EntryType.FILE),
        Entry(path=b"/abs", type=EntryType.FILE),
        Entry(path=b"nodir/x", type=EntryType.FILE),  # its folder is not in the snapshot
        Entry(path=b"ok/under-a-file", type=EntryType.FILE),
        Entry(path=b"d/link", type=EntryType.HARDLINK, link_target=b"later"),
        Entry(path=b"d/to-dir", type=EntryType.HARDLINK, link_target=b"d"),
        Entry(path=b"d/good", type=EntryType.HARDLINK, link_target=b"ok"),
    ]
    tree = SnapshotTree(_manifest(crafted), lambda ids: [data for _ in ids])
    assert sorted(rel for rel, _ in tree.walk()) == [b"d", b"d/good", b"ok"]
    assert len(tree.skipped) == 7
    assert tree.read(tree.resolve("d/good"), 0, 100) == b"secret"
    assert tree.attr(tree.resolve("ok")).nlink == 2


def test_not_a_manifest_is_refused() -> None:
    with pytest.raises(CorruptData):
        SnapshotTree(b"\x93\x01\x02", lambda ids: [])
    with pytest.raises(CorruptData):
        SnapshotTree(b"", lambda ids: [])
    good = _manifest([Entry(path=b"a", type=EntryType.DIR)])
    with pytest.raises(CorruptData):
        SnapshotTree(good[:-1], lambda ids: [])


def test_a_very_deep_tree_is_walked_and_archived() -> None:
    """A crafted manifest may nest folders thousands deep: no recursion limit is hit."""
    from strata.engine.snapshot_archive import tar_stream

    depth = 3000
    paths = [b"/".join([b"d"] * i) for i in range(1, depth + 1)]
    entries = [Entry(path=p, type=EntryType.DIR) for p in paths]
    entries.append(Entry(path=paths[-1] + b"/f", type=EntryType.SYMLINK, link_target=b"x"))
    tree = SnapshotTree(_manifest(entries), lambda ids: [])
    assert sum(1 for _ in tree.walk()) == depth + 1
    assert tree.readlink(tree.resolve(paths[-1] + b"/f")) == b"x"
    import io
    import tarfile

    members = tarfile.open(fileobj=io.BytesIO(b"".join(tar_stream(tree)))).getmembers()
    assert len(members) == depth + 1 and members[-1].issym()


def test_sequential_reads_are_fetched_ahead_in_the_background(sample) -> None:
    import threading

    store, snap, src = sample
    asked: list[tuple[bytes, str]] = []

    def load(ids: list[bytes]):
        asked.extend((c, threading.current_thread().name) for c in ids)
        return store.load_chunks(ids)

    manifest = b"".join(store.load_chunk(c) for c in snap.manifest_chunk_ids())
    tree = SnapshotTree(manifest, load, read_ahead=128 << 10)
    ino = tree.resolve("docs/deep/big.bin")
    own = [cid for cid, _ in tree.entry(ino).chunks]
    data = [tree.read(ino, off, 64 << 10) for off in range(0, 900_000, 64 << 10)]
    tree.close()  # waits for the read-ahead
    assert b"".join(data) == (src / "docs/deep/big.bin").read_bytes()
    assert [c for c, _ in asked] == own  # in order, only this file's, each once
    assert any(name.startswith("readahead") for _, name in asked)


def test_a_late_read_ahead_skips_what_the_reader_has_passed(sample, monkeypatch) -> None:
    """On a busy machine the read-ahead thread may only get to fetch once the reader has
    gone past its window, and the cache (smaller than the file) has let those chunks go:
    it must not fetch them a second time (a mount read 382 chunks for a file of 353)."""
    import threading

    store, snap, src = sample
    asked: list[bytes] = []

    def load(ids: list[bytes]):
        asked.extend(ids)
        return store.load_chunks(ids)

    manifest = b"".join(store.load_chunk(c) for c in snap.manifest_chunk_ids())
    tree = SnapshotTree(manifest, load, cache_bytes=300_000, read_ahead=64 << 10)
    reader_done = threading.Event()
    real_warm = tree._warm

    def late_warm(*args):  # the read-ahead thread gets the CPU only after the reader
        reader_done.wait(30)
        real_warm(*args)

    monkeypatch.setattr(tree, "_warm", late_warm)
    ino = tree.resolve("docs/deep/big.bin")
    own = [cid for cid, _ in tree.entry(ino).chunks]
    size = tree.entry(ino).size
    data = [tree.read(ino, off, 16 << 10) for off in range(0, size, 16 << 10)]
    reader_done.set()
    tree.close()  # waits for the read-ahead
    assert b"".join(data) == (src / "docs/deep/big.bin").read_bytes()
    assert sum(len(store.load_chunk(c)) for c in set(own)) > 300_000  # the cache let go
    assert sorted(asked) == sorted(set(own))  # each once

"""Manifests that leave the machine carry no files-cache keys (ctime, inode, device), so
a clone's manifest, or an unchanged tree's, is byte for byte the same wherever the tree
lies; hardlinks survive without inode numbers; the agent does not ask the server about
the chunks of its last snapshot."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from strata.agent.sink import HeldChunks
from strata.engine.backup import HashOnlySink, archive_tree, make_snapshot
from strata.engine.restore import restore
from strata.layers.image import LayerContent, build_image, resolve_hardlinks
from strata.layers.rules import LayerRules
from strata.model.entry import Entry, EntryType
from strata.model.manifest import decode_manifest, encode_manifest
from strata.store.chunker import Chunker, ChunkerParams
from strata.store.repository import Store

names = st.binary(min_size=1, max_size=12).map(
    lambda b: b.replace(b"/", b"_").replace(b"\0", b"_")).filter(lambda b: b not in (b".", b".."))
u64 = st.integers(0, (1 << 64) - 1)
u32 = st.integers(0, (1 << 32) - 1)


@st.composite
def entries(draw: st.DrawFn) -> list[Entry]:
    paths = sorted(set(draw(st.lists(names, min_size=1, max_size=8))))
    out = []
    for p in paths:
        typ = draw(st.sampled_from(list(EntryType)))
        chunks = draw(st.lists(st.tuples(st.binary(min_size=32, max_size=32),
                                         st.integers(1, 1 << 20)), max_size=3)) \
            if typ is EntryType.FILE else []
        out.append(Entry(
            path=p, type=typ, mode=draw(st.integers(0, 0o7777)), uid=draw(u32),
            gid=draw(u32), mtime_ns=draw(st.integers(-(1 << 62), 1 << 62)),
            size=sum(n for _, n in chunks), link_target=draw(st.binary(max_size=20)),
            rdev=draw(u64), xattrs=draw(st.dictionaries(st.binary(min_size=1, max_size=8),
                                                        st.binary(max_size=16), max_size=2)),
            sparse=draw(st.booleans()),
            content_hash=draw(st.binary(min_size=32, max_size=32)) if chunks else b"",
            chunks=chunks, ctime_ns=draw(st.integers(0, 1 << 62)), inode=draw(u64),
            dev=draw(u64)))
    return out


def _strip(e: Entry) -> Entry:
    return Entry(**{**{f: getattr(e, f) for f in Entry.__slots__},  # type: ignore[attr-defined]
                    "ctime_ns": 0, "inode": 0, "dev": 0})


@settings(max_examples=200, deadline=None)
@given(es=entries())
def test_manifest_round_trips_with_and_without_stat_keys(es: list[Entry]):
    full = b"".join(encode_manifest(es))
    assert list(decode_manifest([full])) == es
    bare = b"".join(encode_manifest(es, stat_keys=False))
    assert list(decode_manifest([bare])) == [_strip(e) for e in es]
    # in any slicing, and never larger than with the keys
    assert list(decode_manifest([bare[i:i + 7] for i in range(0, len(bare), 7)])) == \
        [_strip(e) for e in es]
    assert len(bare) <= len(full)


def _tree(root: Path) -> None:
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/a.so").write_bytes(os.urandom(100_000))
    os.link(root / "usr/lib/a.so", root / "usr/lib/b.so")
    (root / "usr/lib/c").write_bytes(b"c" * 5000)
    os.symlink("a.so", root / "usr/lib/link")
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("one\n")


def _scan(root: Path, stat_keys: bool):
    sink = HashOnlySink(Chunker(ChunkerParams(16 << 10, 64 << 10, 256 << 10)))
    return archive_tree(sink, root, parent_entries=None, stat_keys=stat_keys)


def test_a_copied_tree_has_the_same_manifest_without_stat_keys(tmp_path: Path):
    _tree(tmp_path / "one")
    one_root, two_root = tmp_path / "one", tmp_path / "two"
    shutil.copytree(one_root, two_root, symlinks=True)  # new inodes and ctimes
    os.unlink(two_root / "usr/lib/b.so")  # copytree copies a hardlink's data: link it again
    os.link(two_root / "usr/lib/a.so", two_root / "usr/lib/b.so")
    st_ = os.stat(one_root / "usr/lib")
    os.utime(two_root / "usr/lib", ns=(st_.st_atime_ns, st_.st_mtime_ns))
    one, two = _scan(one_root, False), _scan(two_root, False)
    assert one.manifest_bytes == two.manifest_bytes
    assert one.local_manifest != two.local_manifest  # the files caches are each machine's
    local = {e.path: e for e in decode_manifest([one.local_manifest])}
    assert local[b"usr/lib/c"].inode == os.stat(tmp_path / "one/usr/lib/c").st_ino
    stored = {e.path: e for e in decode_manifest([one.manifest_bytes])}
    assert (stored[b"usr/lib/c"].inode, stored[b"usr/lib/c"].ctime_ns,
            stored[b"usr/lib/c"].dev) == (0, 0, 0)
    assert stored[b"usr/lib/b.so"].type is EntryType.HARDLINK
    assert stored[b"usr/lib/b.so"].link_target == b"usr/lib/a.so"
    assert _scan(tmp_path / "one", True).manifest_bytes == one.local_manifest


def test_hardlinks_survive_a_manifest_without_inodes(tmp_path: Path):
    """A snapshot stored without stat keys restores its hardlinks as hardlinks; a layer
    made of it lays each further name down as a copy of the first."""
    src = tmp_path / "src"
    _tree(src)
    store = Store.init(tmp_path / "store")
    archive = archive_tree(store, src, parent_entries=None, stat_keys=False)
    snap = make_snapshot(archive, host="h", paths=[str(src)], tags=None, parent=None,
                         trigger="user")
    store.commit_snapshot(snap, archive.referenced)
    out = tmp_path / "out"
    result = restore(store, store.load_snapshot(snap.id), out)
    assert not result.errors
    a, b = os.stat(out / "usr/lib/a.so"), os.stat(out / "usr/lib/b.so")
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert (out / "usr/lib/b.so").read_bytes() == (src / "usr/lib/a.so").read_bytes()

    entries = list(decode_manifest([archive.manifest_bytes]))
    assert all(e.inode == 0 for e in entries)
    copies = {e.path: e for e in resolve_hardlinks(entries)}
    first, second = copies[b"usr/lib/a.so"], copies[b"usr/lib/b.so"]
    assert second.type is EntryType.FILE
    assert (second.chunks, second.content_hash, second.size) == \
        (first.chunks, first.content_hash, first.size)
    image = build_image([LayerContent("base os:1", "base", entries)], LayerRules.default("linux"))
    assert image.entries[b"usr/lib/b.so"].type is EntryType.FILE
    assert image.entries[b"usr/lib/b.so"].chunks == first.chunks
    assert b"etc/hostname" not in image.entries  # identity: never in a layer's image


def test_held_chunks_answers_from_the_last_manifest(tmp_path: Path):
    _tree(tmp_path / "t")
    archive = _scan(tmp_path / "t", False)
    held = HeldChunks(archive.local_manifest)
    ids = [c for e in decode_manifest([archive.manifest_bytes]) for c, _ in e.chunks]
    assert ids and all(c in held for c in ids)
    assert os.urandom(32) not in held
    assert b"\0" * 32 not in held
    assert os.urandom(32) not in HeldChunks(b"not a manifest")  # damaged: ask about all

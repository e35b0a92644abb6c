"""Manifests that leave the machine carry no files-cache keys (ctime, inode, device), so
a clone's manifest, or an unchanged tree's, is byte for byte the same wherever the tree
lies; hardlinks survive without inode numbers; the agent does not ask the server about
the chunks of its last snapshot."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import zstandard
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strata.agent.manifest_delta import as_stored, desired_manifests, pick_base
from strata.agent.sink import HeldChunks
from strata.agent.state import AgentState
from strata.engine.backup import HashOnlySink, archive_tree, make_snapshot
from strata.engine.delta import MAGIC, MAX_DELTA_BYTES, GroupDelta, decode, encode, pack_deltas
from strata.engine.restore import restore
from strata.layers.image import LayerContent, build_image, resolve_hardlinks
from strata.layers.rules import LayerRules
from strata.model.entry import Entry, EntryType
from strata.model.ids import content_id
from strata.model.manifest import HEADER, decode_manifest, encode_manifest
from strata.model.transfer import BundleWriter
from strata.model.wire import CheckinResponse
from strata.server.app import create_app
from strata.server.context import ServerSettings
from strata.store.chunker import Chunker, ChunkerParams
from strata.store.crypto import PlainCipher
from strata.store.pack import BlobCodec
from strata.store.repository import Store
from tier import examples

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


@settings(max_examples=examples(200), deadline=None)
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
    held = HeldChunks([archive.local_manifest])
    ids = [c for e in decode_manifest([archive.manifest_bytes]) for c, _ in e.chunks]
    assert ids and all(c in held for c in ids)
    assert os.urandom(32) not in held
    assert b"\0" * 32 not in held
    assert os.urandom(32) not in HeldChunks([b"not a manifest"])  # damaged: ask about all


# -- a manifest sent as a delta (POST /agent/manifests) ---------------------------------------


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory):
    """An enrolled endpoint with one committed snapshot (its manifest: two entries)."""
    data: Path = tmp_path_factory.mktemp("manifests") / "data"
    app = create_app(ServerSettings(data_dir=data))
    token = (data / "admin.token").read_text().strip()
    with TestClient(app, raise_server_exceptions=False) as client:
        tok = client.post("/api/v1/admin/tokens", json={"uses": 1},
                          headers={"Authorization": f"Bearer {token}"}).json()["token"]
        cred = client.post("/api/v1/agent/enroll", json={"token": tok}).json()["credential"]
        client.headers["Authorization"] = f"Bearer {cred}"
        base = _manifest([Entry(path=b"etc", type=EntryType.DIR),
                          Entry(path=b"etc/motd", type=EntryType.SYMLINK, link_target=b"x")])
        w = BundleWriter()
        w.add(content_id(base), len(base), BlobCodec(PlainCipher(), 1).compress(base))
        assert client.post("/api/v1/agent/chunks", content=w.getvalue()).status_code == 200
        resp = client.post("/api/v1/agent/snapshots", json={
            "manifest": [[content_id(base).hex(), len(base)]],
            "manifest_id": content_id(base).hex(), "kind": "centralize"})
        assert resp.status_code == 200, resp.text
        yield SimpleNamespace(client=client)


def _head(device) -> tuple[str, bytes]:
    """The endpoint's latest snapshot and its manifest (the base a delta may patch)."""
    resp = device.client.get("/api/v1/agent/snapshots/latest/manifest")
    assert resp.status_code == 200, resp.text
    return resp.headers["X-Strata-Snapshot"], resp.content


def _manifest(es: list[Entry]) -> bytes:
    return b"".join(encode_manifest(es, stat_keys=False))


def _delta_body(old: bytes, new: bytes, size: int | None = None, key: bytes | None = None,
                old_key: bytes | None = None) -> bytes:
    return pack_deltas([GroupDelta(old_key or content_id(old), key or content_id(new),
                                   len(new) if size is None else size, encode(old, new, 3))])


def _send(device, body: bytes, base: str | None = None):
    return device.client.post(f"/api/v1/agent/manifests?base={base or _head(device)[0]}",
                              content=body)


def test_manifest_delta_is_rebuilt_stored_and_committed(device):
    es = [Entry(path=b"etc", type=EntryType.DIR), Entry(path=b"etc/hostname",
                                                        type=EntryType.SYMLINK, link_target=b"h"),
          Entry(path=b"etc/motd", type=EntryType.SYMLINK, link_target=b"x")]
    new = _manifest(es)
    resp = _send(device, _delta_body(_head(device)[1], new))
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["manifest_id"] == content_id(new).hex()
    assert answer["manifest"] == [[content_id(new).hex(), len(new)]]
    commit = device.client.post("/api/v1/agent/snapshots", json={
        "manifest": answer["manifest"], "manifest_id": answer["manifest_id"]})
    assert commit.status_code == 200, commit.text
    got = device.client.get(f"/api/v1/agent/snapshots/{commit.json()['snapshot']}/manifest")
    assert list(decode_manifest([got.content])) == es


def test_manifest_delta_refusals(device):
    new = _manifest([Entry(path=b"a", type=EntryType.DIR)])
    other = "ab" * 32
    assert _send(device, _delta_body(_head(device)[1], new), base=other).status_code == 404
    assert _send(device, _delta_body(_head(device)[1], new), base="../../x").status_code == 422
    # made against something else than the base's manifest
    assert _send(device, _delta_body(b"something else", new)).status_code == 422
    # the rebuilt bytes are not what the record names
    assert _send(device, _delta_body(_head(device)[1], new, key=b"\1" * 32)).status_code == 422
    # not a manifest at all, though it rebuilds and matches its id
    assert _send(device, _delta_body(_head(device)[1], b"just bytes")).status_code == 422
    assert _send(device, b"not a delta").status_code == 422
    assert _send(device, pack_deltas([])).status_code == 422


def test_manifest_delta_bomb_is_bounded(device):
    """A delta that rebuilds far more than it declares is refused having decoded at most
    the declared size plus one byte; one declaring more than the bound is refused unread."""
    base = _head(device)[1]
    bomb = HEADER + bytes(MAX_DELTA_BYTES)  # 64 MiB of zeros: a few kilobytes as a delta
    body = _delta_body(base, bomb, size=1000)
    assert len(body) < 64 << 10
    resp = _send(device, body)  # its window alone is too large for what it declares
    assert resp.status_code == 422 and "too much memory" in resp.text
    # within the window a 1000-byte manifest may use, it still rebuilds 64 MiB
    small_window = zstandard.ZstdCompressor(
        dict_data=zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT),
        compression_params=zstandard.ZstdCompressionParameters.from_level(3, window_log=17))
    frame = small_window.compress(bomb)
    assert len(frame) < 64 << 10
    body = pack_deltas([GroupDelta(content_id(base), content_id(bomb), 1000, frame)])
    resp = _send(device, body)
    assert resp.status_code == 422 and "1001 bytes, not 1000" in resp.text, resp.text
    huge = pack_deltas([GroupDelta(content_id(_head(device)[1]), b"\0" * 32, MAX_DELTA_BYTES + 1,
                                   b"\x28\xb5\x2f\xfd")])
    assert _send(device, huge).status_code == 422
    # a frame asking for a window far larger than the sizes need
    frame = zstandard.ZstdCompressor(
        compression_params=zstandard.ZstdCompressionParameters.from_level(
            3, window_log=30)).compress(b"x" * 1000)
    forged = pack_deltas([GroupDelta(content_id(_head(device)[1]), content_id(b"x" * 1000), 1000,
                                     frame)])
    assert _send(device, forged).status_code == 422


@settings(max_examples=examples(150), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=st.one_of(
    st.binary(max_size=200),
    st.builds(lambda recs: pack_deltas(recs), st.lists(st.builds(
        GroupDelta, st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32),
        st.integers(0, 1 << 20), st.binary(max_size=64)), max_size=2)),
    st.builds(lambda data: MAGIC + data, st.binary(max_size=120))),
    own_base=st.booleans())
def test_manifest_delta_route_answers_4xx_never_500(device, body, own_base):
    resp = _send(device, body, base=None if own_base else "cd" * 32)
    assert resp.status_code in (200, 404, 413, 422), resp.text


def test_manifest_delta_base_is_the_head_else_the_largest_kept_layer(tmp_path: Path):
    state = AgentState(tmp_path / "state")
    state.path.mkdir()
    (state.path / "layers").mkdir()
    local = b"".join(encode_manifest([Entry(path=b"a", type=EntryType.FILE, inode=7,
                                            ctime_ns=9, dev=3)]))
    state.save_parent("1" * 64, local)
    small, large = _manifest([Entry(path=b"x", type=EntryType.DIR)]), \
        _manifest([Entry(path=b"x" * 50, type=EntryType.DIR)])
    (state.path / "layers" / f"{'2' * 64}.manifest").write_bytes(small)
    (state.path / "layers" / f"{'3' * 64}.manifest").write_bytes(large)

    def info(head: str | None, layers: list[str]) -> CheckinResponse:
        return CheckinResponse.model_validate({
            "endpoint_id": "e", "state": "active", "policy": {}, "last_snapshot": head,
            "server_time": "2026-12-02T00:00:00Z",
            "chunker": {"min_size": 1, "avg_size": 2, "max_size": 4, "zstd_level": 3},
            "desired": {"key": "k", "layers": [
                {"id": 1, "kind": "base", "name": "n", "version": "1", "snapshot": s}
                for s in layers]}})

    # the last snapshot, as the server stored it (no stat keys)
    assert pick_base(state, info("1" * 64, ["2" * 64, "3" * 64])) == \
        ("1" * 64, as_stored(local))
    assert as_stored(local) == _manifest([Entry(path=b"a", type=EntryType.FILE)])
    # the server's head is another (a restore to new hardware): the largest kept layer
    assert pick_base(state, info("f" * 64, ["2" * 64, "3" * 64, "4" * 64])) == \
        ("3" * 64, large)
    state.reset_parent()
    assert pick_base(state, info(None, ["2" * 64])) == ("2" * 64, small)
    assert pick_base(state, info(None, [])) is None
    assert sorted(desired_manifests(state, info(None, ["3" * 64, "2" * 64, "9" * 64]))) == \
        sorted([small, large])


@settings(max_examples=examples(100), deadline=None)
@given(old=entries(), new=entries())
def test_manifest_delta_round_trips(old: list[Entry], new: list[Entry]):
    """What the agent sends rebuilds, from the manifest the server stored, exactly the new
    one; the stored form of a local manifest is the stat-key-free encoding."""
    local_old = b"".join(encode_manifest(old))
    stored_old = as_stored(local_old)
    assert stored_old == _manifest(old)
    stored_new = _manifest(new)
    frame = encode(stored_old, stored_new, 9)
    assert decode(stored_old, frame, len(stored_new)) == stored_new

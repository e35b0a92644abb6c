"""Damaged stores: check names the damaged pack and the files it hurts; restore saves the rest."""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import pytest

from strata.engine.backup import backup
from strata.engine.check import check
from strata.engine.prune import prune
from strata.engine.restore import restore
from strata.store.repository import Store

pytestmark = pytest.mark.e2e

PASS = "correct horse battery staple"
VICTIM = "sub/victim.bin"


def build_source(root: Path) -> Path:
    """Incompressible files of 40-150 KB, so 256 KiB packs hold only a few files each."""
    rng = random.Random(7)
    for i in range(24):
        path = root / f"d{i % 4}" / f"file{i:02d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randrange(40_000, 150_000)))
    (root / VICTIM).parent.mkdir(parents=True, exist_ok=True)
    (root / VICTIM).write_bytes(rng.randbytes(200_000))
    (root / "empty").write_bytes(b"")
    return root


def file_chunks(store: Store, sid: str) -> dict[str, list[bytes]]:
    snap = store.load_snapshot(sid)
    return {os.fsdecode(e.path): [c for c, _ in e.chunks] for e in store.iter_manifest(snap)
            if e.chunks}


@pytest.fixture
def backed_up(tmp_path, new_store):
    """(store dir, source, [snapshot ids]) for a plain or encrypted store with 2 snapshots."""

    def make(passphrase: str | None = None) -> tuple[Path, Path, list[str]]:
        src = build_source(tmp_path / "src")
        store_dir = new_store(passphrase=passphrase)
        with Store.open(store_dir, passphrase) as store:
            first = backup(store, src).snapshot
            (src / "later.txt").write_bytes(b"added for the second snapshot\n")
            second = backup(store, src).snapshot
        return store_dir, src, [first, second]

    return make


def locate(store_dir: Path, sid: str, relpath: str, passphrase: str | None = None):
    """(pack name, chunk location, files using that chunk) for `relpath`'s first chunk."""
    with Store.open(store_dir, passphrase) as store:
        users = file_chunks(store, sid)
        cid = users[relpath][0]
        loc = store.index.lookup(cid)
        assert loc is not None
        return loc.pack, loc, sorted(p for p, cs in users.items() if cid in cs)


def pack_path(store_dir: Path, name: str) -> Path:
    return store_dir / "packs" / name[:2] / name


def files_in_pack(store_dir: Path, sid: str, name: str, beyond: int = 0) -> list[str]:
    """Files with a chunk in pack `name` (only chunks ending past offset `beyond`)."""
    with Store.open(store_dir) as store:
        ids = {e.id for e in store.index.pack_chunks(name) if e.offset + e.length > beyond}
        return sorted(p for p, cs in file_chunks(store, sid).items() if ids & set(cs))


def test_flipped_byte_in_pack_is_named_with_hurt_files(cli, backed_up, stores, trees):
    store_dir, src, sids = backed_up()
    pack, loc, users = locate(store_dir, sids[0], VICTIM)
    assert users == [VICTIM]
    assert len(stores.pack_paths(store_dir)) > 5, "small packs should spread the files out"
    stores.flip_byte(pack_path(store_dir, pack), loc.offset + loc.length // 2)

    doc = cli.json("check", store_dir, "--read-data", rc=1)
    assert doc["ok"] is False
    assert [d["pack"] for d in doc["damaged_packs"]] == [pack]
    assert doc["damaged_snapshots"] == []
    hurt = {h["snapshot"]: h for h in doc["hurt"]}
    assert sorted(hurt) == sorted(sids), "both snapshots use the damaged chunk"
    for h in hurt.values():
        assert h["files"] == [VICTIM] and h["count"] == 1

    # the structural check does not read blobs: it may pass or fail, but must not crash
    proc = cli.run("check", store_dir, "--json")
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr


def test_truncated_pack_is_named(cli, backed_up):
    store_dir, _, sids = backed_up()
    pack, _, _ = locate(store_dir, sids[0], VICTIM)
    path = pack_path(store_dir, pack)
    cut = path.stat().st_size // 2
    in_pack = files_in_pack(store_dir, sids[0], pack)
    past_cut = files_in_pack(store_dir, sids[0], pack, beyond=cut)
    assert VICTIM in in_pack and past_cut
    os.truncate(path, cut)

    # Structure only: the trailer is gone, so every chunk of the pack counts as lost.
    # Reading the data: the chunks before the cut still verify; only the rest are lost.
    for extra, expected in (((), in_pack), (("--read-data",), past_cut)):
        doc = cli.json("check", store_dir, *extra, rc=1)
        assert doc["ok"] is False
        assert [d["pack"] for d in doc["damaged_packs"]] == [pack], extra
        assert "truncated" in doc["damaged_packs"][0]["reason"], doc["damaged_packs"]
        hurt = {h["snapshot"]: h["files"] for h in doc["hurt"]}
        assert hurt[sids[0]] == expected, extra


def test_missing_pack_is_named(cli, backed_up):
    store_dir, _, sids = backed_up()
    pack, _, _ = locate(store_dir, sids[0], VICTIM)
    expected = files_in_pack(store_dir, sids[0], pack)
    pack_path(store_dir, pack).unlink()
    doc = cli.json("check", store_dir, rc=1)
    assert doc["damaged_packs"] == [{"pack": pack, "reason": "missing"}]
    assert {h["snapshot"]: h["files"] for h in doc["hurt"]}[sids[0]] == expected


def test_restore_of_unaffected_files_still_works(cli, backed_up, stores, trees, tmp_path):
    store_dir, src, sids = backed_up()
    want = trees.tree_state(src)
    pack, loc, _ = locate(store_dir, sids[1], VICTIM)
    stores.flip_byte(pack_path(store_dir, pack), loc.offset + loc.length // 2)

    out = tmp_path / "out"
    doc = cli.json("restore", store_dir, sids[1], out, rc=1)
    assert len(doc["errors"]) == 1 and doc["errors"][0].startswith(VICTIM + ":"), doc["errors"]
    assert doc["files"] == sum(stat.S_ISREG(e[0]) for e in want["entries"].values()) - 1
    got = trees.tree_state(out)
    victim = os.fsencode(VICTIM)
    del want["entries"][victim]
    got["entries"].pop(victim, None)
    trees.assert_same_state(got, want)

    # the human-readable form names the file too, and still exits 1
    proc = cli.run("restore", store_dir, sids[1], tmp_path / "out2")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert VICTIM in proc.stdout + proc.stderr


def test_repair_index_rebuilds_from_packs(cli, backed_up, stores, trees, tmp_path):
    store_dir, src, sids = backed_up()
    want = trees.tree_state(src)
    n_packs = len(stores.pack_paths(store_dir))
    with Store.open(store_dir) as store:
        chunks = store.index.chunk_count()
    for suffix in ("", "-wal", "-shm"):
        (store_dir / f"index.sqlite{suffix}").unlink(missing_ok=True)

    doc = cli.json("repair-index", store_dir)
    assert doc == {"packs": n_packs, "chunks": chunks, "damaged_packs": []}
    doc = cli.json("check", store_dir, "--read-data")
    assert doc["ok"] is True and doc["chunks_verified"] == chunks and doc["warnings"] == []
    cli.ok("restore", store_dir, sids[1], tmp_path / "out")
    trees.assert_same_state(trees.tree_state(tmp_path / "out"), want)


def test_check_reindexes_a_lost_index_from_the_packs(cli, backed_up, stores):
    """The index is derived data: check rebuilds what is missing from pack trailers
    (and says so) instead of reporting every chunk lost."""
    store_dir, _src, _sids = backed_up()
    n_packs = len(stores.pack_paths(store_dir))
    for suffix in ("", "-wal", "-shm"):
        (store_dir / f"index.sqlite{suffix}").unlink(missing_ok=True)
    doc = cli.json("check", store_dir, "--read-data")
    assert doc["ok"] is True and doc["hurt"] == []
    assert doc["warnings"] == [f"indexed {n_packs} pack(s) left out of the index by an "
                               "interrupted writer"]


def test_flipped_byte_in_encrypted_pack_is_detected(cli, backed_up, stores, trees, tmp_path):
    store_dir, src, sids = backed_up(PASS)
    want = trees.tree_state(src)
    pack, loc, users = locate(store_dir, sids[0], VICTIM, PASS)
    assert users == [VICTIM]
    assert cli.json("check", store_dir, "--read-data", passphrase=PASS)["ok"] is True
    stores.flip_byte(pack_path(store_dir, pack), loc.offset + loc.length // 2)

    doc = cli.json("check", store_dir, "--read-data", passphrase=PASS, rc=1)
    assert [d["pack"] for d in doc["damaged_packs"]] == [pack]
    assert sorted(h["snapshot"] for h in doc["hurt"]) == sorted(sids)
    assert all(h["files"] == [VICTIM] for h in doc["hurt"])

    doc = cli.json("restore", store_dir, sids[1], tmp_path / "out", passphrase=PASS, rc=1)
    assert len(doc["errors"]) == 1 and doc["errors"][0].startswith(VICTIM + ":")
    got = trees.tree_state(tmp_path / "out")
    victim = os.fsencode(VICTIM)
    del want["entries"][victim]
    got["entries"].pop(victim, None)
    trees.assert_same_state(got, want)


def damage_snapshot_record(store_dir: Path, sid: str) -> None:
    path = store_dir / "snapshots" / sid
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_damaged_snapshot_record_is_reported(cli, backed_up, trees, tmp_path):
    store_dir, src, sids = backed_up()
    want = trees.tree_state(src)
    damage_snapshot_record(store_dir, sids[0])
    doc = cli.json("check", store_dir, rc=1)
    assert [d["snapshot"] for d in doc["damaged_snapshots"]] == [sids[0]]
    assert doc["damaged_packs"] == [] and doc["hurt"] == []
    # the other snapshot is untouched and restores whole
    cli.ok("restore", store_dir, sids[1][:12], tmp_path / "out")
    trees.assert_same_state(trees.tree_state(tmp_path / "out"), want)


def test_damaged_snapshot_record_does_not_block_new_backups(cli, backed_up, trees, tmp_path):
    store_dir, src, sids = backed_up()
    damage_snapshot_record(store_dir, sids[0])
    (src / "newer.txt").write_bytes(b"a backup after the damage\n")
    want = trees.tree_state(src)
    new = cli.json("backup", store_dir, src)["snapshot"]
    proc = cli.run("snapshots", store_dir, "--json")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert sids[0][:8] in proc.stderr  # a warning names the damaged record
    listed = [s["id"] for s in json.loads(proc.stdout)]
    assert listed == [sids[1], new]
    with Store.open(store_dir) as store:
        assert restore(store, store.resolve_snapshot("latest"), tmp_path / "out").errors == []
    trees.assert_same_state(trees.tree_state(tmp_path / "out"), want)

    # prune cannot know what the damaged record uses, so it refuses (one line, exit 2) ...
    proc = cli.run("prune", store_dir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert sids[0][:8] in proc.stderr and proc.stderr.strip().count("\n") == 0
    # ... until the record is forgotten by id
    cli.ok("forget", store_dir, sids[0][:8])
    with Store.open(store_dir) as store:
        assert sorted(store.snapshot_ids()) == sorted([sids[1], new])
        prune(store)
        assert check(store, read_data=True).ok

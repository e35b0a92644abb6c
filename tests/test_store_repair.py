"""A damaged store heals: `strata store repair` keeps every chunk that verifies, drops the
damaged packs, names the snapshots and files that need what was lost, and the next backup
of the intact source stores those chunks again, after which every snapshot is whole.
Before that, a restore of a damaged file says so and leaves no partial file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from strata.engine.backup import backup
from strata.store.repository import Store

pytestmark = pytest.mark.e2e  # the CLI as a real process

VICTIM = "sub/victim.bin"


@pytest.fixture
def damaged(tmp_path, new_store, stores):
    """(store dir, source, [two snapshot ids], damaged pack name): one byte of the victim
    file's first chunk flipped in its pack, which holds other files' chunks too."""
    src = tmp_path / "src"
    rng = random.Random(11)
    for i in range(16):
        path = src / f"d{i % 3}/file{i:02d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randrange(30_000, 90_000)))
    (src / VICTIM).parent.mkdir(parents=True)
    (src / VICTIM).write_bytes(rng.randbytes(150_000))
    store_dir = new_store()
    with Store.open(store_dir) as store:
        first = backup(store, src).snapshot
        (src / "later.txt").write_text("for the second snapshot\n")
        second = backup(store, src).snapshot
        snap = store.load_snapshot(first)
        victim = next(e for e in store.iter_manifest(snap) if e.path == VICTIM.encode())
        loc = store.index.lookup(victim.chunks[0][0])
        assert loc is not None
        neighbours = [e for e in store.index.pack_chunks(loc.pack) if e.id != victim.chunks[0][0]]
    assert neighbours, "the damaged pack must hold intact chunks to salvage"
    stores.flip_byte(store_dir / "packs" / loc.pack[:2] / loc.pack, loc.offset + loc.length // 2)
    return store_dir, src, [first, second], loc.pack


def test_restoring_a_damaged_file_names_it_and_leaves_no_partial_file(cli, damaged, tmp_path):
    store_dir, _, sids, _ = damaged
    doc = cli.json("restore", store_dir, sids[0], tmp_path / "out", rc=1)
    assert [e.split(":")[0] for e in doc["errors"]] == [VICTIM]
    assert not (tmp_path / "out" / VICTIM).exists()
    assert (tmp_path / "out/d0/file00.bin").exists()


def test_repair_then_backup_heals_the_store(cli, damaged, stores, tmp_path):
    store_dir, src, sids, pack = damaged
    # Backing up again without repair does not heal: the damaged chunk stays indexed.
    with Store.open(store_dir) as store:
        backup(store, src)
    assert cli.json("check", store_dir, "--read-data", rc=1)["damaged_packs"][0]["pack"] == pack

    dry = cli.json("repair", store_dir, "--dry-run", rc=1)
    assert [(d["pack"], d["lost"]) for d in dry["damaged"]] == [(pack, 1)]
    assert cli.json("check", store_dir, "--read-data", rc=1)["damaged_packs"]  # unchanged

    doc = cli.json("repair", store_dir, rc=1)
    [d] = doc["damaged"]
    assert d["pack"] == pack and d["lost"] == 1 and d["salvaged"] >= 1 and doc["new_packs"] == 1
    hurt = {h["snapshot"]: h["files"] for h in doc["hurt"]}
    assert all(hurt[s] == [VICTIM] for s in sids) and not doc["whole"]
    assert not any(p.name == pack for p in stores.pack_paths(store_dir))
    out = cli.run("repair", store_dir)
    assert out.returncode == 1 and VICTIM in out.stdout and "Traceback" not in out.stderr
    # Every pack verifies now; the snapshots still lack the one chunk.
    after = cli.json("check", store_dir, "--read-data", rc=1)
    assert after["damaged_packs"] == [] and after["missing_chunks"] >= 1

    # The intact source backed up again stores the lost chunk: all is whole.
    cli.json("backup", store_dir, src)
    assert cli.json("check", store_dir, "--read-data")["ok"] is True
    assert cli.json("repair", store_dir)["whole"] is True
    cli.json("restore", store_dir, sids[0], tmp_path / "healed")
    assert (tmp_path / "healed" / VICTIM).read_bytes() == (src / VICTIM).read_bytes()


def test_a_missing_pack_is_dropped_and_named(cli, damaged, tmp_path):
    store_dir, src, sids, pack = damaged
    os.unlink(Path(store_dir) / "packs" / pack[:2] / pack)
    doc = cli.json("repair", store_dir, rc=1)
    assert [(d["pack"], d["reason"], d["salvaged"]) for d in doc["damaged"]] == [
        (pack, "missing", 0)]
    assert VICTIM in doc["hurt"][0]["files"]
    cli.json("backup", store_dir, src)
    assert cli.json("check", store_dir, "--read-data")["ok"] is True


def test_repair_reports_its_progress_pack_by_pack(damaged):
    from strata.engine.repair import repair

    store_dir, _, _, _ = damaged
    with Store.open(store_dir) as store:
        total = sum(store.index.packs().values())
        sizes: list[int] = []
        result = repair(store, dry_run=True, on_pack=sizes.append)
    assert sum(sizes) == total and len(sizes) == result.packs_checked

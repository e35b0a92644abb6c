"""A store whose disk fills up mid-backup: the backup stops with a clear error instead of
saving a snapshot that silently lacks files, and nothing already saved is hurt."""

from __future__ import annotations

import contextlib
import errno

import pytest

from strata.engine.check import check
from strata.errors import StoreWriteFailed
from strata.model.ids import content_id
from strata.store import pack as pack_mod
from strata.store.repository import Store


def fill_disk_after(monkeypatch, limit: int) -> None:
    """Pack data writes fail with ENOSPC once `limit` bytes have gone to packs."""
    written = [0]
    real = pack_mod.PackWriter._spill

    def spill(self):
        written[0] += self._gathered
        if written[0] > limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self)

    monkeypatch.setattr(pack_mod.PackWriter, "_spill", spill)


# Small packs fail as they are finished (the pack writer thread); large ones while a
# reader adds to them.
@pytest.mark.parametrize("pack_size", [256 << 10, 16 << 20])
def test_full_disk_stops_backup_and_loses_nothing(tmp_path, trees, stores, new_store,
                                                  monkeypatch, pack_size):
    store_dir = new_store(pack_size=pack_size)
    src = tmp_path / "src"
    trees.make_tree(src, seed=3, files=40)
    first = stores.lib_backup(store_dir, src)
    state = trees.tree_state(src)
    trees.make_tree(src / "more", seed=4, files=200)  # new data: a few MiB to write

    with monkeypatch.context() as m:
        fill_disk_after(m, 1 << 20)
        with pytest.raises(StoreWriteFailed, match="No space left on device"):
            stores.lib_backup(store_dir, src)

    with Store.open(store_dir) as store:
        assert [s.id for s in store.snapshots()] == [first.snapshot]  # nothing half-saved
        assert check(store, read_data=True).ok
    assert not list((store_dir / "tmp").iterdir()), "failed packs left behind"
    stores.lib_restore(store_dir, first.snapshot, tmp_path / "out")
    trees.assert_same_state(trees.tree_state(tmp_path / "out"), state)

    again = stores.lib_backup(store_dir, src)  # space is back: the next backup completes
    assert again.errors == [] and again.files_new > 0


def test_server_answers_a_full_disk_with_507(tmp_path):
    """An agent told 400 would take its upload for malformed; 507 says the server is out of
    space, which an administrator can fix and the agent can retry."""
    from fastapi.testclient import TestClient

    from strata.server.app import create_app
    from strata.server.context import ServerSettings

    app = create_app(ServerSettings(data_dir=tmp_path / "data", maintenance_interval=3600))

    @app.post("/test/full")
    def full() -> None:
        raise StoreWriteFailed("could not write to the store: No space left on device")

    with TestClient(app) as client:
        resp = client.post("/test/full")
    assert resp.status_code == 507
    assert resp.json() == {"detail": "could not write to the store: No space left on device"}


def test_a_long_lived_store_recovers_once_there_is_room(tmp_path, new_store, monkeypatch):
    """The server keeps its store open: a failed background pack write is reported (once,
    to the writer that meets it, and again by flush) and then writes work again."""
    import os

    store_dir = new_store(pack_size=64 << 10)
    with Store.open(store_dir) as store:
        chunks = [os.urandom(40_000) for _ in range(12)]
        ids = [content_id(c) for c in chunks]
        with monkeypatch.context() as m:
            fill_disk_after(m, 0)
            with pytest.raises(StoreWriteFailed):
                store.store_chunks(ids[:6], chunks[:6])
                store.flush()
            # When store_chunks met the first failure, a second pack may still be on its
            # way to the same full disk (a failure of its own, reported when it comes):
            # flush waits for it, so that the disk is "freed" only after both.
            with contextlib.suppress(StoreWriteFailed):
                store.flush()
        store.store_chunks(ids[6:], chunks[6:])  # no stale error left behind
        store.flush()
        assert store.missing_chunks(ids[6:]) == []
        store.store_chunks(ids[:6], chunks[:6])  # the lost ones can be stored again
        store.flush()
        assert store.missing_chunks(ids) == []
        assert [store.load_chunk(c) for c in ids] == chunks

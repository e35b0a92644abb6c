"""Prune's cost to the backups running beside it: what it holds while it marks, and what
it does under the commit lock (every backup waits on that lock to commit)."""

from __future__ import annotations

import contextlib
import copy
import random

from strata.engine import prune as prune_mod
from strata.engine.backup import backup
from strata.engine.check import check
from strata.store.repository import SNAPSHOT_AAD, Store


def small_store(tmp_path, trees, stores, *, snapshots: int, forget: int):
    """A store of `snapshots` snapshots (one real backup, the rest records naming the same
    manifest, as many endpoints of one image would) with `forget` real ones forgotten."""
    store = tmp_path / "store"
    Store.init(store, pack_size=256 << 10).close()
    src = tmp_path / "src"
    rng = random.Random(1)
    trees.make_tree(src, seed=1, files=20, dirs=2)
    doomed = []
    for _ in range(forget):
        trees.mutate_tree(src, rng, rewrite=6, add=2, remove=0)
        doomed.append(stores.lib_backup(store, src).snapshot)
    kept = stores.lib_backup(store, src).snapshot
    with Store.open(store) as s:
        base = s.load_snapshot(kept)
        for i in range(snapshots - 1):
            twin = copy.copy(base)
            twin.host = f"endpoint-{i}"
            s.backend.save("snapshots", twin.compute_id(),
                           s.cipher.seal(twin.to_bytes(), SNAPSHOT_AAD))
        for sid in doomed:
            s.remove_snapshot(sid)
    stores.age_packs(store)
    return store, src


class LockWatch:
    """Counts the snapshots a store reads while it holds the commit lock; runs
    `before_lock` once, just before the store first takes it."""

    def __init__(self, store: Store, before_lock=None):
        self.before_lock = before_lock
        self.inside = False
        self.loads_inside: list[str] = []
        self.loads_outside: list[str] = []
        real_lock, real_load = store.commit_lock, store.load_snapshot

        @contextlib.contextmanager
        def lock():
            if self.before_lock is not None:
                self.before_lock()
                self.before_lock = None
            with real_lock():
                self.inside = True
                try:
                    yield
                finally:
                    self.inside = False

        def load(sid):
            (self.loads_inside if self.inside else self.loads_outside).append(sid)
            return real_load(sid)

        store.commit_lock = lock
        store.load_snapshot = load


def test_prune_reads_under_the_commit_lock_only_snapshots_of_the_last_moment(
        tmp_path, trees, stores):
    """Snapshots committed while prune repacked are marked before it takes the lock;
    under it, only one committed after that catching up is read, whatever the number of
    snapshots in the store (it used to rebuild a set of all of them per snapshot)."""
    store, src = small_store(tmp_path, trees, stores, snapshots=60, forget=3)
    with Store.open(store) as ps, ps.session("prune"):
        plan = prune_mod.plan_prune(ps)
        assert plan.delete or plan.repack, plan
        with Store.open(store) as bs:
            during = [backup(bs, src, parent=False).snapshot for _ in range(3)]
            last = []

            def one_more_backup():  # lands after prune caught up, before it locks
                (src / "late").write_bytes(random.Random(2).randbytes(50_000))
                last.append(backup(bs, src, parent=False).snapshot)

            watch = LockWatch(ps, before_lock=one_more_backup)
            done = prune_mod.execute_prune(ps, plan)
    assert sorted(watch.loads_outside) == sorted(during)
    assert watch.loads_inside == last
    assert done.deleted_packs + done.repacked_packs > 0, done
    with Store.open(store) as s:
        assert check(s, read_data=True).ok
        assert set(during + last) <= set(s.snapshot_ids())


def test_nothing_is_read_under_the_lock_when_nothing_was_committed(tmp_path, trees, stores):
    store, _ = small_store(tmp_path, trees, stores, snapshots=30, forget=2)
    with Store.open(store) as ps, ps.session("prune"):
        plan = prune_mod.plan_prune(ps)
        watch = LockWatch(ps)
        done = prune_mod.execute_prune(ps, plan)
    assert watch.loads_inside == [] and watch.loads_outside == []
    assert done.deleted_packs + done.repacked_packs > 0, done


def test_backups_index_their_packs_while_prune_marks(tmp_path, trees, stores):
    """Marking a large store takes minutes. A backup finishing a pack meanwhile must not
    wait for prune to finish marking: the index would give up on it after its busy
    timeout (60 s) and fail the backup with "database is locked"."""
    store, src = small_store(tmp_path, trees, stores, snapshots=5, forget=1)
    results = []
    with Store.open(store) as ps:
        real_load = ps.load_snapshot

        def load(sid):  # in the middle of marking, another process backs up new data
            if not results:
                (src / "new").write_bytes(random.Random(3).randbytes(600_000))
                with Store.open(store) as bs:
                    bs.index.db.execute("PRAGMA busy_timeout=300")
                    results.append(backup(bs, src))
            return real_load(sid)

        ps.load_snapshot = load
        prune_mod.prune(ps)
    assert results[0].errors == [] and results[0].files_new > 0
    with Store.open(store) as s:
        assert results[0].snapshot in s.snapshot_ids()
        assert check(s, read_data=True).ok

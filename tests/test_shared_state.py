"""Several processes on one store: the index, locks, sessions, holdings and the cache
generation in a PostgreSQL database (store/pg_shared.py, server/holdings_pg.py,
server/cache_coherence.py), each checked against what the single-process SQLite versions
do. Each `Store` or `PgShared` here has connections of its own, as a process would.
"""

from __future__ import annotations

import random
import threading

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from strata.engine.check import check
from strata.engine.prune import prune
from strata.errors import StoreLocked, StrataError
from strata.model.ids import content_id
from strata.server.cache_coherence import ALL, CacheInvalidations
from strata.server.holdings import Holdings
from strata.server.holdings_pg import PgHoldings
from strata.store.index import ChunkIndex
from strata.store.pack import PackEntry
from strata.store.pg_shared import PgShared
from strata.store.repository import Store

pytestmark = pytest.mark.e2e


@pytest.fixture
def pg(pg_cluster):
    """A fresh database; `engine()` is a new pool on it (one per simulated process)."""
    url = pg_cluster.new_database("shared").replace("postgresql://", "postgresql+psycopg://")
    engines: list[Engine] = []

    def engine() -> Engine:
        e = create_engine(url, pool_size=4, max_overflow=8)
        engines.append(e)
        return e

    yield engine
    for e in engines:
        e.dispose()


def _entries(seed: int, n: int) -> list[PackEntry]:
    return [PackEntry(bytes([seed, i]) * 16, i * 100, 90, 200) for i in range(n)]


def _exercise(index) -> dict:
    """The same calls on either index; what they answered."""
    a, b = _entries(1, 5), _entries(2, 3)
    index.add_pack("pa", 1000, a)
    index.add_pack("pb", 600, b + a[:2])  # two chunks also in pa: pa keeps them
    out: dict = {"present": sorted(index.present([a[0].id, b[0].id, b"\0" * 32])),
                 "where": {c.hex(): loc.pack for c, loc in
                           index.locate([e.id for e in a + b]).items()},
                 "count": index.chunk_count(), "totals": index.totals(),
                 "packs": index.packs(), "pb": index.pack_chunks("pb")}
    index.begin_marks()
    index.mark([a[0].id, a[1].id, b[0].id, b"\7" * 32])
    out["marked"] = (index.marked_count(), index.marked_missing())
    out["usage"] = sorted(index.pack_usage(), key=lambda u: u.name)
    out["live_pa"] = index.live_chunks_in("pa")
    out["holding"] = index.packs_holding_marks(["pa", "pb", "nope"])
    index.end_marks()
    index.move_chunks("pc", 300, a[:1])
    out["moved"] = index.lookup(a[0].id).pack
    index.drop_packs(["pa"])
    out["after_drop"] = (index.chunk_count(), sorted(index.packs()))
    out["missing"] = index.lookup(a[2].id)
    return out


def test_postgresql_index_answers_as_the_sqlite_one(pg, tmp_path):
    sqlite = ChunkIndex(tmp_path / "index.sqlite")
    index, _ = PgShared(pg().raw_connection).open("store-1")
    try:
        assert _exercise(index) == _exercise(sqlite)
    finally:
        sqlite.close()
        index.close()


def test_one_catalog_serves_one_store(pg):
    PgShared(pg().raw_connection).open("store-1")
    with pytest.raises(Exception, match="indexes the store store-1"):
        PgShared(pg().raw_connection).open("store-2")


def test_prune_and_maintenance_locks_are_one_holder_at_a_time(pg):
    _, one = PgShared(pg().raw_connection).open("s")
    _, two = PgShared(pg().raw_connection).open("s")
    with one.exclusive("prune", what="prune"):
        with pytest.raises(StoreLocked, match="another server process"):
            with two.exclusive("prune", what="prune"):
                pass
        with two.exclusive("maintenance", what="maintenance"):  # another job: free
            pass
    with two.exclusive("prune", what="prune"):  # released with the block
        pass


def test_a_prune_that_lost_its_lock_with_its_connection_stops(pg):
    """A cut connection releases the advisory lock: another process may start a prune, so
    the first one checks before its irreversible step (engine/prune.py) and stops."""
    _, one = PgShared(pg().raw_connection).open("s")
    _, two = PgShared(pg().raw_connection).open("s")
    with one.exclusive("prune", what="prune") as job:
        job.confirm()
        cur = job.conn.cursor()
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
        killer = pg().raw_connection()
        killer.cursor().execute("SELECT pg_terminate_backend(%s)", (pid,))
        killer.commit()
        killer.close()
        with pytest.raises(StoreLocked, match="its lock's database connection was lost"):
            job.confirm()
        with two.exclusive("prune", what="prune") as other:  # free for another process
            other.confirm()


def test_commit_lock_excludes_other_processes(pg):
    _, one = PgShared(pg().raw_connection).open("s")
    _, two = PgShared(pg().raw_connection).open("s")
    order: list[str] = []
    inside = threading.Event()

    def other() -> None:
        inside.wait(10)
        with two.commit_lock():
            order.append("two")

    t = threading.Thread(target=other)
    t.start()
    with one.commit_lock():
        inside.set()
        t.join(0.5)  # it waits on the lock meanwhile
        order.append("one")
    t.join(10)
    assert order == ["one", "two"]


def test_sessions_of_other_processes_are_seen_and_dead_ones_dropped(pg):
    _, one = PgShared(pg().raw_connection).open("s")
    _, two = PgShared(pg().raw_connection).open("s")
    session = one.session("upload:ep")
    seen = two.live_sessions()
    assert [s["kind"] for s in seen] == ["upload:ep"]
    assert seen[0]["started"] == pytest.approx(session.started)
    assert one.live_sessions(exclude=session) == []
    # A process that died on this host: its session no longer holds prune back.
    two.db.query("UPDATE strata_sessions SET pid=%s", (2 ** 22 + 12345,))
    assert two.live_sessions() == []
    session.close()


def test_two_processes_storing_the_same_chunks_lose_and_orphan_nothing(pg, tmp_path, trees):
    """Two stores (as two server processes) on one directory and one database store the
    same files at once: each chunk is indexed once, in a pack that holds it; check reads
    every chunk back; prune then drops the redundant copies and loses nothing."""
    path = tmp_path / "store"
    Store.init(path, pack_size=256 << 10, shared=PgShared(pg().raw_connection)).close()
    a = Store.open(path, shared=PgShared(pg().raw_connection))
    b = Store.open(path, shared=PgShared(pg().raw_connection))
    rng = random.Random(5)
    chunks = [rng.randbytes(20_000) for _ in range(300)]
    ids = [content_id(c) for c in chunks]
    barrier = threading.Barrier(2)

    def write(store: Store) -> None:
        barrier.wait()
        for i in range(0, len(chunks), 10):
            store.store_chunks(ids[i:i + 10], chunks[i:i + 10])
        store.flush()

    threads = [threading.Thread(target=write, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert a.index.chunk_count() == len(set(ids))
    assert a.load_chunks(ids) == chunks  # every one where the index says
    assert b.load_chunks(ids) == chunks
    # Nothing references them: prune (on one process) deletes every pack, orphaning none.
    prune(a)
    assert a.index.chunk_count() == 0 and b.index.packs() == {}
    res = check(b, read_data=True)
    assert res.ok, res
    a.close()
    b.close()


def test_a_store_whose_index_is_in_the_database_is_refused_without_it(pg, tmp_path):
    """`strata store` on the servers' store would trust a stale SQLite index (dedup
    against pruned chunks) and take locks no server sees: it is refused in one line."""
    path = tmp_path / "store"
    Store.init(path, shared=PgShared(pg().raw_connection)).close()
    with pytest.raises(StrataError, match="PostgreSQL catalog; work on it through the "
                       "server") as caught:
        Store.open(path)
    assert "\n" not in str(caught.value)
    Store.open(path, shared=PgShared(pg().raw_connection)).close()  # the servers' way


def test_holdings_in_postgresql_answer_as_in_sqlite(pg, tmp_path):
    def run(h) -> list:
        x, y, z = b"x" * 32, b"y" * 32, b"z" * 32
        h.record("ep1", [x, y])
        h.record("ep2", [x])
        h.record("ep3", [x])
        h.share([z])
        out = [h.view("ep1", [x, y, z]), h.view("ep2", [y])]
        h.inherit("ep4", "ep1")
        out.append(h.view("ep4", [x, y]))
        h.forget_endpoint("ep1")
        out.append(h.view("ep1", [x, y]))
        h.index_snapshot("snap", lambda: [y, z])
        h.index_snapshot("snap", lambda: pytest.fail("indexed twice"))
        out.append(h.in_snapshots(["snap", "other"], [x, y, z]))
        h.seed_once("ep5", lambda: [z])
        out.append(h.view("ep5", [z])[0])
        out.append(h.sweep(lambda batch: {c for c in batch if c != y}))
        out.append(h.view("ep4", [x, y]))
        return out

    sqlite = Holdings(tmp_path / "h.sqlite")
    try:
        assert run(PgHoldings(pg().raw_connection)) == run(sqlite)
    finally:
        sqlite.close()


def test_another_processes_change_reaches_this_cache_within_the_interval(pg):
    now = [0.0]
    one = CacheInvalidations(pg().raw_connection, clock=lambda: now[0])
    two = CacheInvalidations(pg().raw_connection, clock=lambda: now[0])
    assert two.changes() == set()  # first look: its cache holds nothing older
    assert one.changes() == set()
    one.publish("device:abc")
    assert two.changes() is None  # looked less than a second ago: trusts its cache
    now[0] += 1.0
    assert two.changes() == {"device:abc"}  # at most a second later: that key only
    now[0] += 1.0
    assert two.changes() == set()
    one.publish("last:ep1")
    one.publish()  # an administrator's change: everything
    now[0] += 1.0
    assert two.changes() == {"last:ep1", ALL}


def test_invalidations_committed_out_of_order_are_never_skipped(pg):
    """Two processes publishing at once: each reader sees every key, in counter order."""
    now = [0.0]
    reader = CacheInvalidations(pg().raw_connection, clock=lambda: now[0])
    reader.changes()
    writers = [CacheInvalidations(pg().raw_connection) for _ in range(4)]
    seen: set[str] = set()

    def write(k: int) -> None:
        for i in range(25):
            writers[k].publish(f"key-{k}-{i}")

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        now[0] += 1.0
        seen |= reader.changes() or set()
    for t in threads:
        t.join()
    now[0] += 1.0
    seen |= reader.changes() or set()
    assert seen == {f"key-{k}-{i}" for k in range(4) for i in range(25)}


def test_a_reader_that_missed_trimmed_rows_drops_everything(pg):
    now = [0.0]
    one = CacheInvalidations(pg().raw_connection, clock=lambda: now[0])
    two = CacheInvalidations(pg().raw_connection, clock=lambda: now[0])
    two.changes()
    one.publish("a")
    one.publish("b")
    one.db.query("DELETE FROM strata_invalidations WHERE key='a'")  # as the trim does
    now[0] += 1.0
    assert two.changes() == {ALL}

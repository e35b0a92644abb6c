"""Proof-of-possession holdings (server/holdings.py) in the PostgreSQL catalog database, so
that an endpoint's proofs made through one server process count on every other: the same
tables and queries as the SQLite file, shared.

Like the chunk index these rows are derived data (lost, an endpoint only proves or uploads
again), created here rather than by the catalog's migrations (docs/deployment.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from strata.server.holdings import COMMON_HOLDERS, SWEEP_BUDGET
from strata.store.pg_shared import Connect, Connections

SCHEMA = """
CREATE TABLE IF NOT EXISTS strata_holders (
    eid BIGSERIAL PRIMARY KEY, endpoint TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS strata_held (
    chunk BYTEA NOT NULL, eid BIGINT NOT NULL, PRIMARY KEY (chunk, eid));
CREATE INDEX IF NOT EXISTS strata_held_by_endpoint ON strata_held(eid);
CREATE TABLE IF NOT EXISTS strata_shared (chunk BYTEA PRIMARY KEY);
CREATE TABLE IF NOT EXISTS strata_seeded (endpoint TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS strata_snapshot_chunks (
    snapshot TEXT NOT NULL, chunk BYTEA NOT NULL, PRIMARY KEY (snapshot, chunk));
CREATE TABLE IF NOT EXISTS strata_indexed_snapshots (snapshot TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS strata_sweeps (tbl TEXT PRIMARY KEY, after BYTEA NOT NULL);
"""
_BATCH = 5000
_SWEEP_BATCH = 5000
_TABLES = {"held": "strata_held", "shared": "strata_shared",
           "snapshot_chunks": "strata_snapshot_chunks"}


def _parts(ids: list[bytes]) -> Iterable[list[bytes]]:
    for i in range(0, len(ids), _BATCH):
        yield ids[i:i + _BATCH]


class PgHoldings:
    def __init__(self, connect: Connect, common_holders: int = COMMON_HOLDERS):
        self.common_holders = common_holders
        self.db = Connections(connect)
        self.db.ensure_schema(SCHEMA)
        self._eids: dict[str, int] = {}  # an endpoint's eid never changes
        self._seeded: set[str] = set()
        self._indexed: set[str] = set()  # a snapshot's chunks never change

    def close(self) -> None:
        pass  # the connections are the catalog's pool's

    def _eid(self, endpoint: str) -> int:
        eid = self._eids.get(endpoint)
        if eid is None:
            self.db.query("INSERT INTO strata_holders(endpoint) VALUES (%s) "
                          "ON CONFLICT DO NOTHING", (endpoint,))
            eid = int(self.db.query("SELECT eid FROM strata_holders WHERE endpoint=%s",
                                    (endpoint,))[0][0])
            self._eids[endpoint] = eid
        return eid

    def record(self, endpoint: str, ids: Iterable[bytes]) -> None:
        eid = self._eid(endpoint)
        want = sorted(set(ids))  # sorted: concurrent inserts lock rows in one order
        for part in _parts(want):
            self.db.query("INSERT INTO strata_held(chunk, eid) SELECT unnest(%s::bytea[]), %s "
                          "ON CONFLICT DO NOTHING", (part, eid))

    def seed_once(self, endpoint: str, load: Callable[[], Iterable[bytes]]) -> None:
        if endpoint in self._seeded:
            return
        if not self.db.query("SELECT 1 FROM strata_seeded WHERE endpoint=%s", (endpoint,)):
            self.record(endpoint, load())
            self.db.query("INSERT INTO strata_seeded(endpoint) VALUES (%s) "
                          "ON CONFLICT DO NOTHING", (endpoint,))
        self._seeded.add(endpoint)

    def index_snapshot(self, sid: str, load: Callable[[], Iterable[bytes]]) -> None:
        if sid in self._indexed:
            return
        if not self.db.query("SELECT 1 FROM strata_indexed_snapshots WHERE snapshot=%s",
                             (sid,)):
            chunks = sorted(set(load()))
            with self.db.transaction() as conn:
                cur = conn.cursor()
                for part in _parts(chunks):
                    cur.execute("INSERT INTO strata_snapshot_chunks(snapshot, chunk) "
                                "SELECT %s, unnest(%s::bytea[]) ON CONFLICT DO NOTHING",
                                (sid, part))
                cur.execute("INSERT INTO strata_indexed_snapshots(snapshot) VALUES (%s) "
                            "ON CONFLICT DO NOTHING", (sid,))
        self._indexed.add(sid)

    def in_snapshots(self, sids: list[str], ids: Iterable[bytes]) -> set[bytes]:
        want = list(dict.fromkeys(ids))
        found: set[bytes] = set()
        if not sids or not want:
            return found
        for part in _parts(want):
            found.update(bytes(r[0]) for r in self.db.query(
                "SELECT DISTINCT chunk FROM strata_snapshot_chunks WHERE snapshot = ANY(%s) "
                "AND chunk = ANY(%s)", (sids, part)))
        return found

    def share(self, ids: Iterable[bytes]) -> None:
        for part in _parts(sorted(set(ids))):
            self.db.query("INSERT INTO strata_shared(chunk) SELECT unnest(%s::bytea[]) "
                          "ON CONFLICT DO NOTHING", (part,))

    def view(self, endpoint: str, ids: Iterable[bytes]) -> tuple[set[bytes], set[bytes]]:
        want = list(dict.fromkeys(ids))
        held: set[bytes] = set()
        shared: set[bytes] = set()
        eid = self._eid(endpoint)
        for part in _parts(want):
            for chunk, holders, mine in self.db.query(
                    "SELECT chunk, COUNT(*), BOOL_OR(eid = %s) FROM strata_held "
                    "WHERE chunk = ANY(%s) GROUP BY chunk", (eid, part)):
                if mine:
                    held.add(bytes(chunk))
                if holders >= self.common_holders:
                    shared.add(bytes(chunk))
            shared.update(bytes(r[0]) for r in self.db.query(
                "SELECT chunk FROM strata_shared WHERE chunk = ANY(%s)", (part,)))
        return held, shared

    def inherit(self, endpoint: str, previous: str) -> None:
        eid, old = self._eid(endpoint), self._eid(previous)
        self.db.query("INSERT INTO strata_held(chunk, eid) SELECT chunk, %s FROM strata_held "
                      "WHERE eid=%s ON CONFLICT DO NOTHING", (eid, old))

    def forget_endpoint(self, endpoint: str) -> None:
        rows = self.db.query("SELECT eid FROM strata_holders WHERE endpoint=%s", (endpoint,))
        if rows:
            with self.db.transaction() as conn:
                cur = conn.cursor()
                cur.execute("DELETE FROM strata_held WHERE eid=%s", (rows[0][0],))
                cur.execute("DELETE FROM strata_seeded WHERE endpoint=%s", (endpoint,))
        self._seeded.discard(endpoint)

    def sweep(self, present: Callable[[list[bytes]], set[bytes]],
              budget: int = SWEEP_BUDGET) -> int:
        """As Holdings.sweep; run by the one process that runs maintenance."""
        dropped = 0
        for name, table in _TABLES.items():
            rows = self.db.query("SELECT after FROM strata_sweeps WHERE tbl=%s", (name,))
            after = bytes(rows[0][0]) if rows else b""
            seen = 0
            while seen < budget:
                batch = [bytes(r[0]) for r in self.db.query(
                    f"SELECT DISTINCT chunk FROM {table} WHERE chunk > %s ORDER BY chunk "
                    "LIMIT %s", (after, _SWEEP_BATCH))]
                after = batch[-1] if batch else b""
                seen += len(batch)
                held = present(batch) if batch else set()
                gone = [c for c in batch if c not in held]
                if gone:
                    self.db.query(f"DELETE FROM {table} WHERE chunk = ANY(%s)", (gone,))
                self.db.query("INSERT INTO strata_sweeps(tbl, after) VALUES (%s, %s) "
                              "ON CONFLICT (tbl) DO UPDATE SET after=excluded.after",
                              (name, after))
                dropped += len(gone)
                if len(batch) < _SWEEP_BATCH:
                    break
        return dropped

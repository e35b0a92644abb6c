"""Which chunks each endpoint has proven it holds, and which chunks any endpoint may
learn the server holds: the per-endpoint view behind proof of possession.

An endpoint holds a chunk once it has uploaded its bytes, proven them with a keyed hash
(`server/possession.py`), or committed a snapshot naming it. A chunk is *shared* (its
presence may be told to any endpoint, which then still has to prove it has the bytes)
when it is IT content (a layer's), when some endpoint committed it at a software path
(`shareable_path`), or when at least `common_holders` endpoints hold it. Everything else
is private: to another endpoint it reads exactly like a chunk the server lacks.

Kept in SQLite beside the server's data, like the chunk index (ids are 32-byte keys in a
B-tree, not in RAM), or, with a PostgreSQL catalog, in that database, shared by every
server process (server/holdings_pg.py). It is derived data: lost, an endpoint only
uploads again.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from strata.layers.rules import LayerRules, PathClass

_SCHEMA = """
CREATE TABLE IF NOT EXISTS holders (eid INTEGER PRIMARY KEY, endpoint TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS held (
    chunk BLOB NOT NULL, eid INTEGER NOT NULL, PRIMARY KEY (chunk, eid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS held_by_endpoint ON held(eid);
CREATE TABLE IF NOT EXISTS shared (chunk BLOB PRIMARY KEY) WITHOUT ROWID;
-- endpoints whose snapshots from before this table existed have been taken in
CREATE TABLE IF NOT EXISTS seeded (endpoint TEXT PRIMARY KEY) WITHOUT ROWID;
-- the chunks of the layers (and snapshots) desired states name, indexed once each: an
-- endpoint holds what its assigned layers hold, without decoding their manifests again
CREATE TABLE IF NOT EXISTS snapshot_chunks (
    snapshot TEXT NOT NULL, chunk BLOB NOT NULL, PRIMARY KEY (snapshot, chunk)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS indexed_snapshots (snapshot TEXT PRIMARY KEY) WITHOUT ROWID;
-- where the last sweep of each table stopped
CREATE TABLE IF NOT EXISTS sweeps (tbl TEXT PRIMARY KEY, after BLOB NOT NULL) WITHOUT ROWID;
"""
_BATCH = 500  # ids per IN (...) query
_SWEEP_BATCH = 5000
SWEEP_BUDGET = 1_000_000  # chunks of each table one maintenance pass looks at
# Held by this many endpoints, a chunk is no one endpoint's secret (an OS file of a fleet
# without layers); an attacker needs this many enrolled endpoints of its own to probe.
COMMON_HOLDERS = 3
# Variable state (databases, mail, spools) is user data in effect, wherever rules put it.
_VARIABLE_TOPS = (b"var", b"srv")


def shareable_path(rules: LayerRules, path: bytes) -> bool:
    """True for a path whose content is software (system or application files), which any
    endpoint may learn the server holds; never for identity, user data, configuration or
    variable state, which may hold secrets an attacker could guess."""
    if rules.classify(path) not in (PathClass.SYSTEM, PathClass.USER_APP):
        return False
    top = path.lstrip(b"/").split(b"/", 1)[0].lower()
    return not rules.configuration(path) and top not in _VARIABLE_TOPS


class ChunkHoldings(Protocol):
    """What the services need of holdings: this SQLite file, or PostgreSQL's tables."""

    common_holders: int

    def close(self) -> None: ...
    def record(self, endpoint: str, ids: Iterable[bytes]) -> None: ...
    def seed_once(self, endpoint: str, load: Callable[[], Iterable[bytes]]) -> None: ...
    def index_snapshot(self, sid: str, load: Callable[[], Iterable[bytes]]) -> None: ...
    def in_snapshots(self, sids: list[str], ids: Iterable[bytes]) -> set[bytes]: ...
    def share(self, ids: Iterable[bytes]) -> None: ...
    def view(self, endpoint: str, ids: Iterable[bytes]) -> tuple[set[bytes], set[bytes]]: ...
    def inherit(self, endpoint: str, previous: str) -> None: ...
    def forget_endpoint(self, endpoint: str) -> None: ...
    def sweep(self, present: Callable[[list[bytes]], set[bytes]],
              budget: int = SWEEP_BUDGET) -> int: ...


class Holdings:
    def __init__(self, path: Path, common_holders: int = COMMON_HOLDERS):
        self.common_holders = common_holders
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # lost rows only cost a re-upload
        self.db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._eids: dict[str, int] = {}
        self._seeded: set[str] = set()
        self._indexed: set[str] = set()

    def close(self) -> None:
        self.db.close()

    def _eid(self, endpoint: str) -> int:
        eid = self._eids.get(endpoint)
        if eid is None:
            self.db.execute("INSERT OR IGNORE INTO holders(endpoint) VALUES (?)", (endpoint,))
            eid = self.db.execute("SELECT eid FROM holders WHERE endpoint=?",
                                  (endpoint,)).fetchone()[0]
            self._eids[endpoint] = eid
        return eid

    def record(self, endpoint: str, ids: Iterable[bytes]) -> None:
        """`endpoint` has proven it holds these chunks."""
        with self._lock:
            eid = self._eid(endpoint)
            self.db.execute("BEGIN")
            try:
                self.db.executemany("INSERT OR IGNORE INTO held(chunk, eid) VALUES (?, ?)",
                                    ((c, eid) for c in ids))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def seed_once(self, endpoint: str, load: Callable[[], Iterable[bytes]]) -> None:
        """Record what `load()` returns for `endpoint`, once ever: the chunks of the
        snapshot it had when holdings began (upgraded servers)."""
        if endpoint in self._seeded:
            return
        with self._lock:
            done = self.db.execute("SELECT 1 FROM seeded WHERE endpoint=?",
                                   (endpoint,)).fetchone()
        if not done:
            self.record(endpoint, load())
            with self._lock:
                self.db.execute("INSERT OR IGNORE INTO seeded(endpoint) VALUES (?)",
                                (endpoint,))
        self._seeded.add(endpoint)

    def index_snapshot(self, sid: str, load: Callable[[], Iterable[bytes]]) -> None:
        """Record the chunks of snapshot `sid` (a layer's, or one a revert lays down),
        once ever: `load()` is called only the first time."""
        if sid in self._indexed:
            return
        with self._lock:
            done = self.db.execute("SELECT 1 FROM indexed_snapshots WHERE snapshot=?",
                                   (sid,)).fetchone()
        if not done:
            chunks = load()
            with self._lock:
                self.db.execute("BEGIN")
                try:
                    self.db.executemany("INSERT OR IGNORE INTO snapshot_chunks(snapshot, chunk) "
                                        "VALUES (?, ?)", ((sid, c) for c in chunks))
                    self.db.execute("INSERT OR IGNORE INTO indexed_snapshots(snapshot) "
                                    "VALUES (?)", (sid,))
                    self.db.execute("COMMIT")
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
        self._indexed.add(sid)

    def in_snapshots(self, sids: list[str], ids: Iterable[bytes]) -> set[bytes]:
        """Of `ids`: those some snapshot of `sids` names (indexed with `index_snapshot`)."""
        want = list(dict.fromkeys(ids))
        found: set[bytes] = set()
        if not sids or not want:
            return found
        step = max(1, _BATCH - len(sids))
        with self._lock:
            for i in range(0, len(want), step):
                part = want[i:i + step]
                found.update(row[0] for row in self.db.execute(
                    f"SELECT DISTINCT chunk FROM snapshot_chunks WHERE snapshot IN "
                    f"({','.join('?' * len(sids))}) AND chunk IN ({','.join('?' * len(part))})",
                    [*sids, *part]))
        return found

    def share(self, ids: Iterable[bytes]) -> None:
        """Any endpoint may learn that the server holds these (IT and software content)."""
        with self._lock:
            self.db.execute("BEGIN")
            try:
                self.db.executemany("INSERT OR IGNORE INTO shared(chunk) VALUES (?)",
                                    ((c,) for c in ids))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def view(self, endpoint: str, ids: Iterable[bytes]) -> tuple[set[bytes], set[bytes]]:
        """Of `ids`: those `endpoint` holds, and those it may be told are shared."""
        want = list(dict.fromkeys(ids))
        held: set[bytes] = set()
        shared: set[bytes] = set()
        with self._lock:
            eid = self._eid(endpoint)
            for i in range(0, len(want), _BATCH):
                part = want[i:i + _BATCH]
                marks = ",".join("?" * len(part))
                for chunk, holders, mine in self.db.execute(
                        f"SELECT chunk, COUNT(*), MAX(eid = ?) FROM held WHERE chunk IN "
                        f"({marks}) GROUP BY chunk", [eid, *part]):
                    if mine:
                        held.add(chunk)
                    if holders >= self.common_holders:
                        shared.add(chunk)
                shared.update(row[0] for row in self.db.execute(
                    f"SELECT chunk FROM shared WHERE chunk IN ({marks})", part))
        return held, shared

    def inherit(self, endpoint: str, previous: str) -> None:
        """`endpoint` is the machine `previous` was (it proved it held that credential):
        it holds what `previous` held."""
        with self._lock:
            eid, old = self._eid(endpoint), self._eid(previous)
            self.db.execute("INSERT OR IGNORE INTO held(chunk, eid) SELECT chunk, ? FROM held "
                            "WHERE eid=?", (eid, old))

    def forget_endpoint(self, endpoint: str) -> None:
        """A deleted endpoint holds nothing any more (nor counts toward shared chunks)."""
        with self._lock:
            row = self.db.execute("SELECT eid FROM holders WHERE endpoint=?",
                                  (endpoint,)).fetchone()
            if row is not None:
                self.db.execute("DELETE FROM held WHERE eid=?", (row[0],))
                self.db.execute("DELETE FROM seeded WHERE endpoint=?", (endpoint,))
        self._seeded.discard(endpoint)

    def sweep(self, present: Callable[[list[bytes]], set[bytes]],
              budget: int = SWEEP_BUDGET) -> int:
        """After a prune: forget chunks the store no longer holds (`present` tells which
        of a batch it does). Rows only ever count for chunks the store holds, so this
        keeps the table to the store's size; it is not needed for correctness. Each call
        looks at about `budget` chunks of each table, going on where the last stopped (a
        fleet's table is far larger than one pass should read)."""
        dropped = 0
        for table in ("held", "shared", "snapshot_chunks"):
            with self._lock:
                row = self.db.execute("SELECT after FROM sweeps WHERE tbl=?",
                                      (table,)).fetchone()
            after = row[0] if row else b""
            seen = 0
            while seen < budget:
                with self._lock:
                    batch = [r[0] for r in self.db.execute(
                        f"SELECT DISTINCT chunk FROM {table} WHERE chunk > ? ORDER BY chunk "
                        "LIMIT ?", (after, _SWEEP_BATCH))]
                after = batch[-1] if batch else b""  # at the end: from the start next time
                seen += len(batch)
                held = present(batch) if batch else set()
                gone = [c for c in batch if c not in held]
                with self._lock:
                    if gone:
                        self.db.executemany(f"DELETE FROM {table} WHERE chunk = ?",
                                            ((c,) for c in gone))
                    self.db.execute("INSERT OR REPLACE INTO sweeps(tbl, after) VALUES (?, ?)",
                                    (table, after))
                dropped += len(gone)
                if len(batch) < _SWEEP_BATCH:
                    break
        return dropped

"""Which chunks each endpoint has proven it holds, and which chunks any endpoint may
learn the server holds: the per-endpoint view behind proof of possession.

An endpoint holds a chunk once it has uploaded its bytes, proven them with a keyed hash
(`server/possession.py`), or committed a snapshot naming it. A chunk is *shared* (its
presence may be told to any endpoint, which then still has to prove it has the bytes)
when it is IT content (a layer's), when some endpoint committed it at a software path
(`shareable_path`), or when at least `common_holders` endpoints hold it. Everything else
is private: to another endpoint it reads exactly like a chunk the server lacks.

Kept in SQLite beside the server's data, like the chunk index (ids are 32-byte keys in a
B-tree, not in RAM). It is derived data: lost, an endpoint only uploads again. Several
server processes on one store need it in the shared database too, with the index (#15).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from strata.layers.rules import LayerRules, PathClass

_SCHEMA = """
CREATE TABLE IF NOT EXISTS holders (eid INTEGER PRIMARY KEY, endpoint TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS held (
    chunk BLOB NOT NULL, eid INTEGER NOT NULL, PRIMARY KEY (chunk, eid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS held_by_endpoint ON held(eid);
CREATE TABLE IF NOT EXISTS shared (chunk BLOB PRIMARY KEY) WITHOUT ROWID;
-- endpoints whose snapshots from before this table existed have been taken in
CREATE TABLE IF NOT EXISTS seeded (endpoint TEXT PRIMARY KEY) WITHOUT ROWID;
"""
_BATCH = 500  # ids per IN (...) query
_SWEEP_BATCH = 5000
# Held by this many endpoints, a chunk is no one endpoint's secret (an OS file of a fleet
# without layers); an attacker needs this many minus one colluding endpoints to probe.
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

    def sweep(self, present: Callable[[list[bytes]], set[bytes]]) -> int:
        """After a prune: forget chunks the store no longer holds (`present` tells which
        of a batch it does). Rows only ever count for chunks the store holds, so this
        keeps the table to the store's size; it is not needed for correctness."""
        dropped = 0
        for table in ("held", "shared"):
            after = b""
            while True:
                with self._lock:
                    batch = [r[0] for r in self.db.execute(
                        f"SELECT DISTINCT chunk FROM {table} WHERE chunk > ? ORDER BY chunk "
                        "LIMIT ?", (after, _SWEEP_BATCH))]
                if not batch:
                    break
                after = batch[-1]
                held = present(batch)
                gone = [c for c in batch if c not in held]
                if gone:
                    with self._lock:
                        self.db.executemany(f"DELETE FROM {table} WHERE chunk = ?",
                                            ((c,) for c in gone))
                    dropped += len(gone)
        return dropped

"""Keeping the read caches of several server processes coherent: every change through one
process is written to a log in the catalog database (the key it outdates, or "*" for
all), and every process reads the log's new rows at most once per `interval` before it
trusts its cache, dropping the keys named.

The bound: a change committed through one process is served by no other process's cache
more than `interval` (1 s) plus the duration of one catalog read after it committed. A
commit outdates one endpoint's entries only, so the fleet's other cached credentials and
desired states stay warm; an administrator's change outdates all.

Rows are numbered by a generation counter, bumped in the same transaction: its row lock
makes writers commit in counter order, so a reader that has seen N has seen every row up
to N (a sequence alone can commit out of order and be skipped). A reader that finds rows
missing (trimmed while it slept) drops its whole cache. Only used with a PostgreSQL
catalog: with SQLite there is one process per data directory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from strata.store.pg_shared import Connect, Connections

SCHEMA = """
CREATE TABLE IF NOT EXISTS strata_generation (id INTEGER PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO strata_generation(id, value) VALUES (1, 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS strata_invalidations (gen BIGINT PRIMARY KEY, key TEXT NOT NULL);
"""
CHECK_SECONDS = 1.0
KEEP_ROWS = 10_000  # the log's length: a process asleep for longer drops its whole cache
ALL = "*"


class CacheInvalidations:
    def __init__(self, connect: Connect, interval: float = CHECK_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.db = Connections(connect)
        self.db.ensure_schema(SCHEMA)
        self.interval, self.clock = interval, clock
        self._lock = threading.Lock()
        self._seen: int | None = None
        self._checked = float("-inf")

    def publish(self, key: str = ALL) -> None:
        """After a change committed (and this process dropped the key itself)."""
        with self.db.transaction() as conn:
            cur = conn.cursor()
            cur.execute("UPDATE strata_generation SET value = value + 1 WHERE id=1 "
                        "RETURNING value")
            gen = int(cur.fetchone()[0])
            cur.execute("INSERT INTO strata_invalidations(gen, key) VALUES (%s, %s)",
                        (gen, key[:500]))
            if gen % 1000 == 0:
                cur.execute("DELETE FROM strata_invalidations WHERE gen <= %s",
                            (gen - KEEP_ROWS,))

    def due(self) -> bool:
        """Whether the next `changes` would read the catalog."""
        return self.clock() - self._checked >= self.interval

    def changes(self) -> set[str] | None:
        """The keys other processes outdated since this one last looked ({ALL}: every
        key), or None when it looked less than `interval` ago."""
        now = self.clock()
        with self._lock:
            if now - self._checked < self.interval:
                return None
            self._checked = now
            seen = self._seen
        if seen is None:
            value = int(self.db.query("SELECT value FROM strata_generation WHERE id=1")[0][0])
            with self._lock:
                self._seen = value if self._seen is None else self._seen
            return set()  # a cache that starts now holds nothing older
        rows = self.db.query("SELECT gen, key FROM strata_invalidations WHERE gen > %s "
                             "ORDER BY gen", (seen,))
        if not rows:
            return set()
        keys = {key for _, key in rows}
        if rows[0][0] != seen + 1:  # trimmed away while this process was not looking
            keys = {ALL}
        with self._lock:
            self._seen = max(self._seen or 0, int(rows[-1][0]))
        return keys

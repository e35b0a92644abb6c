"""Keeping the read caches of several server processes coherent: a generation counter in
the catalog database that every change bumps and every process reads, at most once per
`interval`, before it trusts its cache.

The bound: a change committed through one process is served by no other process's cache
more than `interval` (1 s) plus the duration of one catalog read after it committed. A
process that sees the counter move clears its whole cache (server/read_cache.py: loads
that began before are not stored), so what it serves next is read after the change.
Only used with a PostgreSQL catalog: with SQLite there is one process per data directory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from strata.store.pg_shared import Connect, Connections

SCHEMA = """
CREATE TABLE IF NOT EXISTS strata_generation (id INTEGER PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO strata_generation(id, value) VALUES (1, 0) ON CONFLICT DO NOTHING;
"""
CHECK_SECONDS = 1.0


class CatalogGeneration:
    def __init__(self, connect: Connect, interval: float = CHECK_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.db = Connections(connect)
        self.db.ensure_schema(SCHEMA)
        self.interval, self.clock = interval, clock
        self._lock = threading.Lock()
        self._seen: int | None = None
        self._checked = float("-inf")

    def _read(self) -> int:
        return int(self.db.query("SELECT value FROM strata_generation WHERE id=1")[0][0])

    def changed(self) -> bool:
        """True when another process changed the catalog since this one last looked (at
        most one read of the counter per `interval`)."""
        now = self.clock()
        with self._lock:
            if now - self._checked < self.interval:
                return False
            self._checked = now
        value = self._read()
        with self._lock:
            moved = self._seen is not None and value != self._seen
            self._seen = value
        return moved

    def bump(self) -> None:
        """After a change committed (and this process cleared its own cache)."""
        value = int(self.db.query("UPDATE strata_generation SET value = value + 1 "
                                  "WHERE id=1 RETURNING value")[0][0])
        with self._lock:
            # Only our own step is known to be seen: another process's bump in between
            # must still clear this cache at the next check.
            if self._seen is not None and value == self._seen + 1:
                self._seen = value

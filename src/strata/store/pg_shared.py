"""The chunk index, the locks and the writer sessions of a store in a PostgreSQL database,
shared by every server process on that database, on any host.

What the SQLite index and the lock files do for processes on one host, this does for
processes on many: one `strata_chunks` table (so a chunk stored by one process is found
by all), PostgreSQL advisory locks for the commit lock and for prune (held by a
connection: a process killed or cut off releases them), and a table of writer sessions.
Two processes storing the same chunk at once both write it into their packs; the first
pack indexed keeps it (`ON CONFLICT DO NOTHING`), and the other copy is dead bytes that
prune repacks away: no chunk is lost, none indexed in a pack that does not hold it.

The tables are the store's derived data, not the catalog's: created here, outside the
catalog's Alembic chain, so that the store package stands on its own (docs/deployment.md).
Connections come from the caller (the server passes its catalog engine's pool): DB-API
connections with psycopg's `%s` parameters, returned to their pool by `close()`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from strata.errors import StoreLocked, StrataError
from strata.store.index import Location, PackUsage
from strata.store.locks import SESSION_STALE_SECONDS, _pid_alive
from strata.store.pack import PackEntry

Connect = Callable[[], Any]  # a pooled DB-API connection; close() gives it back

# Advisory lock keys: any constants, the same in every process on the database.
_SCHEMA_LOCK = 0x5354524154410002
_COMMIT_LOCK = 0x5354524154410003
_JOB_LOCKS = {"prune": 0x5354524154410004, "maintenance": 0x5354524154410005}
_BATCH = 5000  # ids per array parameter

SCHEMA = """
CREATE TABLE IF NOT EXISTS strata_store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS strata_packs (
    pid BIGSERIAL PRIMARY KEY, name TEXT NOT NULL UNIQUE, size BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS strata_chunks (
    id BYTEA PRIMARY KEY, pid BIGINT NOT NULL, pos BIGINT NOT NULL,
    length INTEGER NOT NULL, raw_length INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS strata_chunks_by_pack ON strata_chunks(pid);
CREATE TABLE IF NOT EXISTS strata_sessions (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
    started DOUBLE PRECISION NOT NULL, refreshed DOUBLE PRECISION NOT NULL);
"""


class Connections:
    """Pooled connections, committed when a block ends; within `transaction()` every call
    of this thread uses that transaction's connection."""

    def __init__(self, connect: Connect):
        self._connect = connect
        self._local = threading.local()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[Any]:
        tx = getattr(self._local, "tx", None)
        if tx is not None:
            yield tx
            return
        conn = self._connect()
        try:
            yield conn
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        if getattr(self._local, "tx", None) is not None:
            raise RuntimeError("nested transaction")
        with self() as conn:
            self._local.tx = conn
            try:
                yield conn
            finally:
                self._local.tx = None

    @contextlib.contextmanager
    def held(self) -> Iterator[Any]:
        """A connection of its own for as long as the block runs, in autocommit (advisory
        locks and temp tables live as long as their connection)."""
        conn = self._connect()
        dbapi: Any = getattr(conn, "driver_connection", None) or conn
        try:
            dbapi.rollback()  # whatever a pool's ping began
            dbapi.autocommit = True
            yield conn
        finally:
            with contextlib.suppress(Exception):
                dbapi.autocommit = False
            conn.close()

    def query(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        with self() as conn:
            cur = conn.cursor()
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def ensure_schema(self, ddl: str) -> None:
        """Create tables that do not exist yet; processes starting at once take turns."""
        with self() as conn:
            cur = conn.cursor()
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in ddl.split(";"):
                if statement.strip():
                    cur.execute(statement)


def _chunks(ids: list[bytes]) -> Iterator[list[bytes]]:
    for i in range(0, len(ids), _BATCH):
        yield ids[i:i + _BATCH]


class PgShared:
    """`SharedState` on PostgreSQL: `Store(..., shared=PgShared(connect))`."""

    def __init__(self, connect: Connect):
        self.db = Connections(connect)

    def open(self, store_id: str) -> tuple[PgChunkIndex, PgCoordination]:
        self.db.ensure_schema(SCHEMA)
        self.db.query("INSERT INTO strata_store_meta(key, value) VALUES ('store', %s) "
                      "ON CONFLICT DO NOTHING", (store_id,))
        bound = self.db.query("SELECT value FROM strata_store_meta WHERE key='store'")[0][0]
        if bound != store_id:
            # Its index would claim chunks this store lacks, and agents would skip them.
            raise StrataError(f"the catalog database indexes the store {bound[:12]}, not "
                              f"this server's store {store_id[:12]}: one catalog serves "
                              "one store")
        return PgChunkIndex(self.db), PgCoordination(self.db)


class PgChunkIndex:
    """store/index.py's contract on PostgreSQL tables."""

    def __init__(self, db: Connections):
        self.db = db
        self._pack_names: dict[int, str] = {}
        self._marks: contextlib.ExitStack | None = None
        self._marks_conn: Any = None

    def close(self) -> None:
        self.end_marks()

    # -- lookups ---------------------------------------------------------------
    def present(self, ids: Iterable[bytes]) -> set[bytes]:
        found: set[bytes] = set()
        for part in _chunks(list(ids)):
            found.update(bytes(r[0]) for r in self.db.query(
                "SELECT id FROM strata_chunks WHERE id = ANY(%s)", (part,)))
        return found

    def _pack_name(self, pid: int) -> str:
        name = self._pack_names.get(pid)
        if name is None:  # pids are never reused (a sequence), so this never goes stale
            rows = self.db.query("SELECT name FROM strata_packs WHERE pid=%s", (pid,))
            name = rows[0][0] if rows else ""
            self._pack_names[pid] = name
        return name

    def locate(self, ids: list[bytes]) -> dict[bytes, Location]:
        found: dict[bytes, Location] = {}
        for part in _chunks(ids):
            for cid, pid, pos, length, raw in self.db.query(
                    "SELECT id, pid, pos, length, raw_length FROM strata_chunks "
                    "WHERE id = ANY(%s)", (part,)):
                found[bytes(cid)] = Location(self._pack_name(pid), pos, length, raw)
        return found

    def lookup(self, cid: bytes) -> Location | None:
        return self.locate([cid]).get(cid)

    # -- packs -----------------------------------------------------------------
    def _put(self, name: str, size: int, entries: Iterable[PackEntry], conflict: str) -> None:
        rows = list({e.id: e for e in reversed(list(entries))}.values())  # first of each id
        with self.db() as conn:
            cur = conn.cursor()
            cur.execute("INSERT INTO strata_packs(name, size) VALUES (%s, %s) "
                        "ON CONFLICT (name) DO NOTHING", (name, size))
            cur.execute("SELECT pid FROM strata_packs WHERE name=%s", (name,))
            pid = cur.fetchone()[0]
            for i in range(0, len(rows), _BATCH):
                part = rows[i:i + _BATCH]
                cur.execute(
                    "INSERT INTO strata_chunks(id, pid, pos, length, raw_length) "
                    "SELECT u.id, %s, u.pos, u.length, u.raw FROM unnest("
                    "%s::bytea[], %s::bigint[], %s::integer[], %s::integer[]) "
                    f"AS u(id, pos, length, raw) ORDER BY u.id {conflict}",
                    (pid, [e.id for e in part], [e.offset for e in part],
                     [e.length for e in part], [e.raw_length for e in part]))

    def add_pack(self, name: str, size: int, entries: Iterable[PackEntry],
                 *, in_transaction: bool = False) -> None:
        # Two processes indexing the same chunk at once: the first keeps it, the other's
        # copy is dead bytes in its pack (ids sorted: concurrent inserts lock rows in one
        # order and cannot deadlock).
        self._put(name, size, entries, "ON CONFLICT (id) DO NOTHING")

    def move_chunks(self, name: str, size: int, entries: Iterable[PackEntry]) -> None:
        self._put(name, size, entries,
                  "ON CONFLICT (id) DO UPDATE SET pid=excluded.pid, pos=excluded.pos, "
                  "length=excluded.length, raw_length=excluded.raw_length")

    def drop_packs(self, names: Iterable[str]) -> None:
        names = list(names)
        if not names:
            return
        with self.db() as conn:
            cur = conn.cursor()
            cur.execute("SELECT pid FROM strata_packs WHERE name = ANY(%s)", (names,))
            pids = [r[0] for r in cur.fetchall()]
            cur.execute("DELETE FROM strata_chunks WHERE pid = ANY(%s)", (pids,))
            cur.execute("DELETE FROM strata_packs WHERE pid = ANY(%s)", (pids,))
        for pid in pids:
            self._pack_names.pop(pid, None)

    def has_pack(self, name: str) -> bool:
        return bool(self.db.query("SELECT 1 FROM strata_packs WHERE name=%s", (name,)))

    def packs(self) -> dict[str, int]:
        return {name: size for name, size in self.db.query("SELECT name, size FROM strata_packs")}

    def pack_chunks(self, name: str) -> list[PackEntry]:
        return [PackEntry(bytes(r[0]), r[1], r[2], r[3]) for r in self.db.query(
            "SELECT c.id, c.pos, c.length, c.raw_length FROM strata_chunks c "
            "JOIN strata_packs p ON p.pid=c.pid WHERE p.name=%s ORDER BY c.pos", (name,))]

    def chunk_count(self) -> int:
        return int(self.db.query("SELECT COUNT(*) FROM strata_chunks")[0][0])

    def totals(self) -> tuple[int, int, int]:
        row = self.db.query("SELECT COUNT(*), COALESCE(SUM(length), 0)::bigint, "
                            "COALESCE(SUM(raw_length), 0)::bigint FROM strata_chunks")[0]
        return int(row[0]), int(row[1]), int(row[2])

    def iter_chunks(self) -> Iterator[tuple[bytes, str, int, int]]:
        for cid, name, length, raw in self.db.query(
                "SELECT c.id, p.name, c.length, c.raw_length FROM strata_chunks c "
                "JOIN strata_packs p ON p.pid=c.pid ORDER BY c.id"):
            yield bytes(cid), name, length, raw

    def clear(self, *, in_transaction: bool = False) -> None:
        with self.db() as conn:
            cur = conn.cursor()
            cur.execute("DELETE FROM strata_chunks")
            cur.execute("DELETE FROM strata_packs")
        self._pack_names.clear()

    def transaction(self) -> contextlib.AbstractContextManager[object]:
        return self.db.transaction()

    # -- mark and sweep (prune) -----------------------------------------------------
    # The marks are a temporary table of one connection, held from begin_marks to
    # end_marks: private to this prune, and gone with the connection if it dies.
    def _mq(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        if self._marks_conn is None:
            raise RuntimeError("begin_marks first")
        cur = self._marks_conn.cursor()
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else []

    def begin_marks(self) -> None:
        if self._marks is None:
            self._marks = contextlib.ExitStack()
            self._marks_conn = self._marks.enter_context(self.db.held())
        self._mq("DROP TABLE IF EXISTS strata_marks")
        self._mq("CREATE TEMP TABLE strata_marks (id BYTEA PRIMARY KEY)")

    def mark(self, ids: Iterable[bytes]) -> None:
        for part in _chunks(list(ids)):
            self._mq("INSERT INTO strata_marks SELECT DISTINCT unnest(%s::bytea[]) "
                     "ON CONFLICT DO NOTHING", (part,))

    def marked_count(self) -> int:
        return int(self._mq("SELECT COUNT(*) FROM strata_marks")[0][0])

    def marked_missing(self) -> int:
        return int(self._mq("SELECT COUNT(*) FROM strata_marks m WHERE NOT EXISTS "
                            "(SELECT 1 FROM strata_chunks c WHERE c.id=m.id)")[0][0])

    def pack_usage(self) -> list[PackUsage]:
        rows = self._mq(
            "SELECT p.name, p.size, COUNT(c.id), "
            "COALESCE(SUM(CASE WHEN m.id IS NULL THEN 0 ELSE c.length END), 0)::bigint, "
            "COALESCE(SUM(CASE WHEN m.id IS NULL THEN c.length ELSE 0 END), 0)::bigint "
            "FROM strata_packs p LEFT JOIN strata_chunks c ON c.pid=p.pid "
            "LEFT JOIN strata_marks m ON m.id=c.id GROUP BY p.pid, p.name, p.size")
        return [PackUsage(n, s, int(c), int(live), int(dead)) for n, s, c, live, dead in rows]

    def live_chunks_in(self, pack: str) -> list[PackEntry]:
        return [PackEntry(bytes(r[0]), r[1], r[2], r[3]) for r in self._mq(
            "SELECT c.id, c.pos, c.length, c.raw_length FROM strata_packs p "
            "JOIN strata_chunks c ON c.pid=p.pid JOIN strata_marks m ON m.id=c.id "
            "WHERE p.name=%s ORDER BY c.pos", (pack,))]

    def packs_holding_marks(self, names: Iterable[str]) -> set[str]:
        names = list(names)
        if not names:
            return set()
        return {r[0] for r in self._mq(
            "SELECT DISTINCT p.name FROM strata_packs p JOIN strata_chunks c ON c.pid=p.pid "
            "JOIN strata_marks m ON m.id=c.id WHERE p.name = ANY(%s)", (names,))}

    def end_marks(self) -> None:
        if self._marks is None:
            return
        stack, self._marks = self._marks, None
        with contextlib.suppress(Exception):
            self._mq("DROP TABLE IF EXISTS strata_marks")
        self._marks_conn = None
        stack.close()


class PgSession:
    """A writer session row; `refresh` keeps it live for other hosts."""

    def __init__(self, db: Connections, kind: str):
        self.db = db
        self.kind = kind
        self.id = uuid.uuid4().hex
        self.started = time.time()
        db.query("INSERT INTO strata_sessions(id, kind, host, pid, started, refreshed) "
                 "VALUES (%s, %s, %s, %s, %s, %s)",
                 (self.id, kind, socket.gethostname(), os.getpid(), self.started, self.started))

    def refresh(self) -> None:
        # Upserted: a session removed as stale (a process paused for an hour) comes back.
        self.db.query("INSERT INTO strata_sessions(id, kind, host, pid, started, refreshed) "
                      "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE "
                      "SET refreshed=excluded.refreshed",
                      (self.id, self.kind, socket.gethostname(), os.getpid(), self.started,
                       time.time()))

    def close(self) -> None:
        self.db.query("DELETE FROM strata_sessions WHERE id=%s", (self.id,))

    def __enter__(self) -> PgSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PgJobLock:
    """An advisory lock lives as long as its session: if this connection still answers,
    it is the same session, and the lock is still ours."""

    def __init__(self, conn: Any, what: str):
        self.conn, self.what = conn, what

    def confirm(self) -> None:
        try:
            self.conn.cursor().execute("SELECT 1")
        except Exception:
            raise StoreLocked(f"{self.what} stopped: its lock's database connection was "
                              "lost, and another process may have taken the lock") from None


class PgCoordination:
    """store/coordination.py's contract with advisory locks and a sessions table."""

    def __init__(self, db: Connections):
        self.db = db
        # This process's commits queue here, not in the database: a waiter on the
        # advisory lock holds a pooled connection, and forty of them would leave the
        # holder none to check its chunks with.
        self._commits = threading.Lock()

    @contextlib.contextmanager
    def commit_lock(self) -> Iterator[None]:
        with self._commits, self.db.held() as conn:
            conn.cursor().execute("SELECT pg_advisory_lock(%s)", (_COMMIT_LOCK,))
            try:
                yield
            finally:
                conn.cursor().execute("SELECT pg_advisory_unlock(%s)", (_COMMIT_LOCK,))

    @contextlib.contextmanager
    def exclusive(self, name: str, what: str) -> Iterator[_PgJobLock]:
        key = _JOB_LOCKS[name]
        with self.db.held() as conn:
            cur = conn.cursor()
            cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
            if not cur.fetchone()[0]:
                raise StoreLocked(f"{what} is running in another server process; "
                                  "try again later")
            try:
                yield _PgJobLock(conn, what)
            finally:
                with contextlib.suppress(Exception):  # a dead connection released it
                    conn.cursor().execute("SELECT pg_advisory_unlock(%s)", (key,))

    def session(self, kind: str) -> PgSession:
        return PgSession(self.db, kind)

    def live_sessions(self, exclude: Any = None) -> list[dict[str, Any]]:
        host, now = socket.gethostname(), time.time()
        out, dead = [], []
        skip = exclude.id if isinstance(exclude, PgSession) else None
        for sid, kind, shost, pid, started, refreshed in self.db.query(
                "SELECT id, kind, host, pid, started, refreshed FROM strata_sessions"):
            if sid == skip:
                continue
            # On this host the process itself is the truth; elsewhere, its last refresh.
            gone = not _pid_alive(pid) if shost == host else \
                now - refreshed > SESSION_STALE_SECONDS
            if gone:
                dead.append(sid)
            else:
                out.append({"kind": kind, "host": shost, "pid": pid, "started": started,
                            "refreshed": refreshed})
        if dead:
            self.db.query("DELETE FROM strata_sessions WHERE id = ANY(%s)", (dead,))
        return out

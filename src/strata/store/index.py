"""The chunk index: chunk id -> (pack, offset, length), kept on disk in SQLite.

SQLite keeps the ids in a B-tree on disk, so a store of tens of millions of chunks is
looked up without holding them in RAM, and several processes (backups, prune, check)
can share it safely. The index is derived data: `rebuild` recreates it from pack
trailers alone.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from strata.store.pack import PackEntry

_SCHEMA = """
CREATE TABLE IF NOT EXISTS packs (
    -- AUTOINCREMENT: a pid is never reused, so a pid -> name cached by another process
    -- can never come to name a different pack after a prune.
    pid INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id BLOB PRIMARY KEY, pid INTEGER NOT NULL, offset INTEGER NOT NULL,
    length INTEGER NOT NULL, raw_length INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks(pid);
"""
_BATCH = 500  # ids per IN (...) query: well under SQLite's variable limit


@dataclass(frozen=True, slots=True)
class PackUsage:
    """How much of a pack the marked chunks still use (prune's sweep)."""

    name: str
    size: int
    chunks: int  # chunks the index locates in this pack
    live_bytes: int  # stored bytes of the marked ones
    dead_bytes: int  # stored bytes of the others


@dataclass(frozen=True, slots=True)
class Location:
    pack: str
    offset: int
    length: int
    raw_length: int


class Index(Protocol):
    """The index's contract, kept by this SQLite file and by the PostgreSQL tables several
    server processes share (store/pg_shared.py)."""

    def close(self) -> None: ...
    def present(self, ids: Iterable[bytes]) -> set[bytes]: ...
    def locate(self, ids: list[bytes]) -> dict[bytes, Location]: ...
    def lookup(self, cid: bytes) -> Location | None: ...
    def add_pack(self, name: str, size: int, entries: Iterable[PackEntry],
                 *, in_transaction: bool = False) -> None: ...
    def move_chunks(self, name: str, size: int, entries: Iterable[PackEntry]) -> None: ...
    def drop_packs(self, names: Iterable[str]) -> None: ...
    def has_pack(self, name: str) -> bool: ...
    def packs(self) -> dict[str, int]: ...
    def pack_chunks(self, name: str) -> list[PackEntry]: ...
    def chunk_count(self) -> int: ...
    def totals(self) -> tuple[int, int, int]: ...
    def iter_chunks(self) -> Iterator[tuple[bytes, str, int, int]]: ...
    def clear(self, *, in_transaction: bool = False) -> None: ...
    def transaction(self) -> contextlib.AbstractContextManager[object]: ...
    # prune's mark and sweep
    def begin_marks(self) -> None: ...
    def mark(self, ids: Iterable[bytes]) -> None: ...
    def marked_count(self) -> int: ...
    def marked_missing(self) -> int: ...
    def pack_usage(self) -> list[PackUsage]: ...
    def live_chunks_in(self, pack: str) -> list[PackEntry]: ...
    def packs_holding_marks(self, names: Iterable[str]) -> set[str]: ...
    def end_marks(self) -> None: ...


class ChunkIndex:
    def __init__(self, path: Path):
        self.path = path
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a killed process; a power cut may drop the newest
        # rows, which only leaves packs unindexed, and `reconcile` indexes them again.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA cache_size=-16384")  # 16 MiB page cache: the OS caches the rest
        self.db.executescript(_SCHEMA)
        self._pack_names: dict[int, str] = {}

    def close(self) -> None:
        self.db.close()

    # -- lookups ---------------------------------------------------------------
    def present(self, ids: Iterable[bytes]) -> set[bytes]:
        """The subset of `ids` that the index holds."""
        ids = list(ids)
        found: set[bytes] = set()
        for i in range(0, len(ids), _BATCH):
            part = ids[i:i + _BATCH]
            q = f"SELECT id FROM chunks WHERE id IN ({','.join('?' * len(part))})"
            found.update(row[0] for row in self.db.execute(q, part))
        return found

    def _pack_name(self, pid: int) -> str:
        name = self._pack_names.get(pid)
        if name is None:
            row = self.db.execute("SELECT name FROM packs WHERE pid=?", (pid,)).fetchone()
            name = row[0] if row else ""
            self._pack_names[pid] = name
        return name

    def locate(self, ids: list[bytes]) -> dict[bytes, Location]:
        """Where each of `ids` the index holds is, in one query per few hundred ids (a
        query per chunk costs a read transaction, and its file locks, each)."""
        found: dict[bytes, Location] = {}
        for i in range(0, len(ids), _BATCH):
            part = ids[i:i + _BATCH]
            q = ("SELECT id, pid, offset, length, raw_length FROM chunks "
                 f"WHERE id IN ({','.join('?' * len(part))})")
            for cid, pid, offset, length, raw_length in self.db.execute(q, part):
                found[cid] = Location(self._pack_name(pid), offset, length, raw_length)
        return found

    def lookup(self, cid: bytes) -> Location | None:
        row = self.db.execute("SELECT pid, offset, length, raw_length FROM chunks WHERE id=?",
                              (cid,)).fetchone()
        if row is None:
            return None
        return Location(self._pack_name(row[0]), row[1], row[2], row[3])

    # -- packs -----------------------------------------------------------------
    def add_pack(self, name: str, size: int, entries: Iterable[PackEntry],
                 *, in_transaction: bool = False) -> None:
        """Index a pack's chunks; a chunk already indexed elsewhere keeps its location."""
        with contextlib.nullcontext() if in_transaction else self.transaction():
            self.db.execute("INSERT OR IGNORE INTO packs(name, size) VALUES (?, ?)", (name, size))
            pid = self.db.execute("SELECT pid FROM packs WHERE name=?", (name,)).fetchone()[0]
            self.db.executemany(
                "INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?)",
                ((e.id, pid, e.offset, e.length, e.raw_length) for e in entries))

    def move_chunks(self, name: str, size: int, entries: Iterable[PackEntry]) -> None:
        """Index a pack and point its chunks at it (repack: the new copy wins)."""
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO packs(name, size) VALUES (?, ?)", (name, size))
            pid = self.db.execute("SELECT pid FROM packs WHERE name=?", (name,)).fetchone()[0]
            self.db.executemany(
                "INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?)",
                ((e.id, pid, e.offset, e.length, e.raw_length) for e in entries))

    def drop_packs(self, names: Iterable[str]) -> None:
        """Forget packs and every chunk still located in them (one transaction)."""
        with self.transaction():
            for name in names:
                row = self.db.execute("SELECT pid FROM packs WHERE name=?", (name,)).fetchone()
                if row:
                    self.db.execute("DELETE FROM chunks WHERE pid=?", (row[0],))
                    self.db.execute("DELETE FROM packs WHERE pid=?", (row[0],))
                    self._pack_names.pop(row[0], None)

    def has_pack(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM packs WHERE name=?", (name,)).fetchone() is not None

    def packs(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT name, size FROM packs"))

    def pack_chunks(self, name: str) -> list[PackEntry]:
        rows = self.db.execute(
            "SELECT c.id, c.offset, c.length, c.raw_length FROM chunks c "
            "JOIN packs p ON p.pid=c.pid WHERE p.name=? ORDER BY c.offset", (name,))
        return [PackEntry(*r) for r in rows]

    def chunk_count(self) -> int:
        return self._count("SELECT COUNT(*) FROM chunks")

    def totals(self) -> tuple[int, int, int]:
        """(chunks, stored bytes of chunks, raw bytes of chunks)."""
        row = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(length),0), COALESCE(SUM(raw_length),0) FROM chunks"
        ).fetchone()
        return row[0], row[1], row[2]

    def iter_chunks(self) -> Iterator[tuple[bytes, str, int, int]]:
        """(id, pack, stored length, raw length) for every chunk, in id order."""
        yield from self.db.execute(
            "SELECT c.id, p.name, c.length, c.raw_length FROM chunks c JOIN packs p "
            "ON p.pid=c.pid")

    def clear(self, *, in_transaction: bool = False) -> None:
        with contextlib.nullcontext() if in_transaction else self.transaction():
            self.db.execute("DELETE FROM chunks")
            self.db.execute("DELETE FROM packs")
        self._pack_names.clear()

    # -- mark and sweep (prune) ---------------------------------------------------
    # The marks (ids of chunks some snapshot needs) live in a table private to this
    # connection and spilled to disk as needed, not in a Python set, so prune's memory
    # stays flat however many chunks the store holds. Writing them takes no lock on the
    # index itself: backups keep indexing their packs while prune marks.
    def begin_marks(self) -> None:
        """Start an empty set of marks (dropping any left by an earlier prune)."""
        self.db.execute("DROP TABLE IF EXISTS temp.marks")
        self.db.execute("CREATE TEMP TABLE marks (id BLOB PRIMARY KEY) WITHOUT ROWID")

    def mark(self, ids: Iterable[bytes]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO temp.marks VALUES (?)",
                            ((cid,) for cid in ids))

    def marked_count(self) -> int:
        return self._count("SELECT COUNT(*) FROM temp.marks")

    def marked_missing(self) -> int:
        """How many marked chunks the index does not hold (a damaged store)."""
        return self._count("SELECT COUNT(*) FROM temp.marks m WHERE NOT EXISTS "
                           "(SELECT 1 FROM chunks c WHERE c.id=m.id)")

    def pack_usage(self) -> list[PackUsage]:
        """Every indexed pack with the stored bytes of its marked and unmarked chunks."""
        rows = self.db.execute(
            "SELECT p.name, p.size, COUNT(c.id), "
            "COALESCE(SUM(CASE WHEN m.id IS NULL THEN 0 ELSE c.length END), 0), "
            "COALESCE(SUM(CASE WHEN m.id IS NULL THEN c.length ELSE 0 END), 0) "
            "FROM packs p LEFT JOIN chunks c ON c.pid=p.pid "
            "LEFT JOIN temp.marks m ON m.id=c.id GROUP BY p.pid")
        return [PackUsage(*row) for row in rows]

    def live_chunks_in(self, pack: str) -> list[PackEntry]:
        """The marked chunks the index locates in `pack`, in pack order (to repack)."""
        rows = self.db.execute(
            "SELECT c.id, c.offset, c.length, c.raw_length FROM packs p "
            "CROSS JOIN chunks c ON c.pid=p.pid CROSS JOIN temp.marks m ON m.id=c.id "
            "WHERE p.name=? ORDER BY c.offset", (pack,))
        return [PackEntry(*r) for r in rows]

    def packs_holding_marks(self, names: Iterable[str]) -> set[str]:
        """Those of `names` in which the index locates a marked chunk. Walks the chunks
        of these packs only (CROSS JOIN fixes that order), not every mark, so it costs
        what is being deleted."""
        held = set()
        for name in names:
            if self.db.execute(
                    "SELECT 1 FROM packs p CROSS JOIN chunks c ON c.pid=p.pid "
                    "CROSS JOIN temp.marks m ON m.id=c.id WHERE p.name=? LIMIT 1",
                    (name,)).fetchone():
                held.add(name)
        return held

    def end_marks(self) -> None:
        self.db.execute("DROP TABLE IF EXISTS temp.marks")

    def _count(self, query: str) -> int:
        return int(self.db.execute(query).fetchone()[0])

    def transaction(self) -> _Transaction:
        return _Transaction(self.db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error; takes the write lock up front."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")

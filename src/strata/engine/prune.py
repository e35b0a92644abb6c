"""Prune: mark every chunk a snapshot needs, sweep the rest, repack mostly-dead packs.

Split into `plan_prune` (read-only, printable) and `execute_prune`, which runs its steps
in a crash-safe order: write and index the repacked packs, then (under the commit lock)
drop the dead packs from the index, then delete their files. A kill at any point leaves
a store that `check` accepts. Packs written since the oldest live writer session began
are never touched, and snapshots committed while prune ran are marked again before
anything is deleted, so a concurrent backup cannot lose a chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from strata.errors import CorruptData, StrataError
from strata.store.locks import Session, file_lock, live_sessions
from strata.store.pack import PackWriter
from strata.store.repository import Store

REPACK_DEAD_FRACTION = 0.5  # "mostly dead": at least half of a pack's bytes unused
_SLACK_SECONDS = 60  # clock slack between a session's start and its first pack
_STALE_TEMP_SECONDS = 86400


@dataclass
class PrunePlan:
    snapshots: list[str] = field(default_factory=list)
    used_chunks: int = 0
    packs: int = 0
    delete: list[str] = field(default_factory=list)  # wholly dead packs
    repack: list[str] = field(default_factory=list)  # mostly dead packs
    exempt: int = 0  # packs too new to judge (a writer may still reference them)
    dead_bytes: int = 0
    live_bytes_to_copy: int = 0
    bytes_freed: int = 0  # stored bytes removed once done (estimate before repack)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PruneResult:
    plan: PrunePlan
    deleted_packs: int = 0
    repacked_packs: int = 0
    new_packs: int = 0
    kept_for_new_snapshots: int = 0
    stale_temp_files: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _mark(store: Store, sids: list[str]) -> None:
    db = store.index.db
    for sid in sids:
        try:
            snap = store.load_snapshot(sid)
        except CorruptData as exc:
            # Its chunks are unknown, so nothing can be judged dead: refuse, do not guess.
            raise StrataError(f"snapshot {sid[:8]} is damaged ({exc}); remove it with "
                              f"`strata store forget DIR {sid[:8]}` before pruning") from None
        mids = snap.manifest_chunk_ids()
        db.executemany("INSERT OR IGNORE INTO temp.used VALUES (?)", ((c,) for c in mids))
        for entry in store.iter_manifest(snap):
            if entry.chunks:
                db.executemany("INSERT OR IGNORE INTO temp.used VALUES (?)",
                               ((c,) for c, _ in entry.chunks))


def plan_prune(store: Store, *, repack_fraction: float = REPACK_DEAD_FRACTION,
               own_session: Session | None = None) -> PrunePlan:
    """Decide what to delete and repack. Leaves marks in temp.used for execute."""
    store.reconcile_index()
    db = store.index.db
    db.execute("DROP TABLE IF EXISTS temp.used")
    # Marks live in SQLite (spilled to disk as needed), not in a Python set, so prune's
    # memory stays flat however many chunks the store holds.
    db.execute("CREATE TEMP TABLE used (id BLOB PRIMARY KEY) WITHOUT ROWID")
    plan = PrunePlan(snapshots=store.snapshot_ids())
    with store.index.transaction():
        _mark(store, plan.snapshots)
    plan.used_chunks = db.execute("SELECT COUNT(*) FROM temp.used").fetchone()[0]
    lost = db.execute("SELECT COUNT(*) FROM temp.used u WHERE NOT EXISTS "
                      "(SELECT 1 FROM chunks c WHERE c.id=u.id)").fetchone()[0]
    if lost:
        raise StrataError(f"{lost} chunk(s) that snapshots need are missing: run "
                          "`strata store check` before pruning")
    sessions = live_sessions(store.locks_dir, exclude=own_session)
    cutoff = min((s["started"] for s in sessions), default=time.time()) - _SLACK_SECONDS
    rows = db.execute(
        "SELECT p.name, p.size, COUNT(c.id), "
        "COALESCE(SUM(CASE WHEN u.id IS NULL THEN c.length ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN u.id IS NULL THEN 0 ELSE c.length END), 0) "
        "FROM packs p LEFT JOIN chunks c ON c.pid=p.pid "
        "LEFT JOIN temp.used u ON u.id=c.id GROUP BY p.pid").fetchall()
    for name, size, count, dead, live in rows:
        plan.packs += 1
        # A pack none of whose chunks are indexed here (their ids are indexed in another
        # pack: a killed repack, two writers racing on one chunk) is wholly redundant.
        if dead == 0 and count > 0:
            continue
        try:
            mtime = store.backend.path("packs", name).stat().st_mtime
        except FileNotFoundError:
            continue  # damaged store: check reports it; never "fix" by deleting more
        if mtime >= cutoff and sessions:
            plan.exempt += 1
            continue
        plan.dead_bytes += dead if count else size
        if live == 0:
            plan.delete.append(name)
            plan.bytes_freed += size
        elif dead >= repack_fraction * (dead + live):
            plan.repack.append(name)
            plan.live_bytes_to_copy += live
            plan.bytes_freed += dead
    return plan


def execute_prune(store: Store, plan: PrunePlan,
                  on_step: Callable[[str], None] | None = None) -> PruneResult:
    started = time.monotonic()
    result = PruneResult(plan=plan)
    db = store.index.db
    writer = store.new_pack_writer()
    new_packs = 0

    def write(w: PackWriter) -> None:
        nonlocal new_packs
        store.install_pack(w, move=True)
        new_packs += 1

    for name in plan.repack:
        live = db.execute(
            "SELECT c.id, c.offset, c.length, c.raw_length FROM chunks c JOIN packs p "
            "ON p.pid=c.pid JOIN temp.used u ON u.id=c.id WHERE p.name=?", (name,)).fetchall()
        for cid, offset, length, raw_length in live:
            blob = store.read_blob(name, offset, length)
            store.codec.decode(cid, blob, raw_length)  # never copy a damaged chunk forward
            writer.add(cid, blob, raw_length)
            if writer.size >= store.config.pack_size:
                write(writer)
                writer = store.new_pack_writer()
        if on_step:
            on_step(name)
    if writer.entries:
        write(writer)
    else:
        writer.discard()
    result.new_packs = new_packs
    doomed = set(plan.delete) | set(plan.repack)
    with store.commit_lock():
        # Snapshots committed while we worked may use chunks we judged dead: keep the
        # packs that hold them (a later prune reconsiders them).
        new = [s for s in store.snapshot_ids() if s not in set(plan.snapshots)]
        if new:
            with store.index.transaction():
                _mark(store, new)
            if doomed:
                marks = ",".join("?" * len(doomed))
                keep = {r[0] for r in db.execute(
                    f"SELECT DISTINCT p.name FROM temp.used u JOIN chunks c ON c.id=u.id "
                    f"JOIN packs p ON p.pid=c.pid WHERE p.name IN ({marks})", list(doomed))}
                result.kept_for_new_snapshots = len(keep)
                doomed -= keep
        store.index.drop_packs(sorted(doomed))
        for name in sorted(doomed):
            store.backend.remove("packs", name)
    result.deleted_packs = len(doomed & set(plan.delete))
    result.repacked_packs = len(doomed & set(plan.repack))
    db.execute("DROP TABLE IF EXISTS temp.used")
    result.stale_temp_files = _remove_stale_temp_files(store)
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _remove_stale_temp_files(store: Store) -> int:
    """Partial packs of killed writers. A live writer's file is left alone: only files
    idle for a day, or any when no other writer is registered, go."""
    tmp = store.path / "tmp"
    if not tmp.is_dir():
        return 0
    others = [s for s in live_sessions(store.locks_dir) if s.get("kind") != "prune"]
    removed = 0
    for p in tmp.glob("pack-*.tmp"):
        try:
            if not others or time.time() - p.stat().st_mtime > _STALE_TEMP_SECONDS:
                p.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed


def prune(store: Store, *, dry_run: bool = False,
          on_step: Callable[[str], None] | None = None) -> PruneResult:
    with file_lock(store.locks_dir / "prune.lock", blocking=False, what="prune"), \
            store.session("prune") as session:
        plan = plan_prune(store, own_session=session)
        if dry_run:
            return PruneResult(plan=plan)
        return execute_prune(store, plan, on_step)

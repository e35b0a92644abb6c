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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from strata.errors import CorruptData, SnapshotNotFound, StrataError
from strata.store.backend import ObjectNotFound
from strata.store.coordination import JobLock, WriterSession
from strata.store.pack import PackWriter
from strata.store.repository import Store

REPACK_DEAD_FRACTION = 0.5  # "mostly dead": at least half of a pack's bytes unused
_SLACK_SECONDS = 60  # clock slack between a session's start and its first pack
_STALE_TEMP_SECONDS = 86400
_MARK_BATCH = 8192  # chunk ids per insert into the marks


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

    def to_dict(self) -> dict[str, Any]:
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mark(store: Store, sids: Iterable[str], marked: set[str]) -> None:
    """Mark every chunk the snapshots `sids` need (their manifests' and their files');
    add each to `marked`."""
    batch: list[bytes] = []
    for sid in sids:
        try:
            snap = store.load_snapshot(sid)
        except SnapshotNotFound:
            continue  # forgotten since it was listed: it needs nothing any more
        except CorruptData as exc:
            # Its chunks are unknown, so nothing can be judged dead: refuse, do not guess.
            raise StrataError(f"snapshot {sid[:8]} is damaged ({exc}); remove it with "
                              f"`strata store forget DIR {sid[:8]}` before pruning") from None
        batch.extend(snap.manifest_chunk_ids())
        for entry in store.iter_manifest(snap):
            if entry.chunks:
                batch.extend(c for c, _ in entry.chunks)
                if len(batch) >= _MARK_BATCH:
                    store.index.mark(batch)
                    batch.clear()
        marked.add(sid)
    store.index.mark(batch)


def _unmarked(store: Store, marked: set[str]) -> list[str]:
    return [sid for sid in store.snapshot_ids() if sid not in marked]


def plan_prune(store: Store, *, repack_fraction: float = REPACK_DEAD_FRACTION,
               own_session: WriterSession | None = None) -> PrunePlan:
    """Decide what to delete and repack. Leaves its marks in the index for execute."""
    store.reconcile_index()
    index = store.index
    index.begin_marks()
    marked: set[str] = set()
    _mark(store, store.snapshot_ids(), marked)
    plan = PrunePlan(snapshots=sorted(marked), used_chunks=index.marked_count())
    lost = index.marked_missing()
    if lost:
        raise StrataError(f"{lost} chunk(s) that snapshots need are missing: run "
                          "`strata store check` before pruning")
    sessions = store.coordination.live_sessions(exclude=own_session)
    cutoff = min((s["started"] for s in sessions), default=time.time()) - _SLACK_SECONDS
    for pack in index.pack_usage():
        plan.packs += 1
        # A pack none of whose chunks are indexed here (their ids are indexed in another
        # pack: a killed repack, two writers racing on one chunk) is wholly redundant.
        if pack.dead_bytes == 0 and pack.chunks > 0:
            continue
        try:
            written = store.backend.stat("packs", pack.name).mtime
        except ObjectNotFound:
            continue  # damaged store: check reports it; never "fix" by deleting more
        if written >= cutoff and sessions:
            plan.exempt += 1
            continue
        plan.dead_bytes += pack.dead_bytes if pack.chunks else pack.size
        if pack.live_bytes == 0:
            plan.delete.append(pack.name)
            plan.bytes_freed += pack.size
        elif pack.dead_bytes >= repack_fraction * (pack.dead_bytes + pack.live_bytes):
            plan.repack.append(pack.name)
            plan.live_bytes_to_copy += pack.live_bytes
            plan.bytes_freed += pack.dead_bytes
    return plan


def execute_prune(store: Store, plan: PrunePlan,
                  on_step: Callable[[str], None] | None = None,
                  job: JobLock | None = None) -> PruneResult:
    started = time.monotonic()
    result = PruneResult(plan=plan)
    writer = store.new_pack_writer()
    new_packs = 0

    def write(w: PackWriter) -> None:
        nonlocal new_packs
        store.install_pack(w, move=True)
        new_packs += 1

    for name in plan.repack:
        for e in store.index.live_chunks_in(name):
            blob = store.read_blob(name, e.offset, e.length)
            store.codec.decode(e.id, blob, e.raw_length)  # never copy a damaged chunk forward
            writer.add(e.id, blob, e.raw_length)
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
    # Snapshots committed while we worked may use chunks we judged dead. Mark them now,
    # before taking the commit lock, so that under it only those committed in the last
    # moments are read: backups wait on that lock to commit. (The lock used to cover
    # all of it, with a set of the plan's snapshots rebuilt for every snapshot listed:
    # held 30-41 ms with 195 snapshots, 130-235 ms with 2,195 and 2.1 s with 8,195, for
    # 5 committed meanwhile; now 5-8, 4-15 and 27-38 ms, mostly listing the snapshots.)
    marked = set(plan.snapshots)
    _mark(store, _unmarked(store, marked), marked)
    with store.commit_lock():
        if job is not None:  # still the only prune: never delete beside another one
            job.confirm()
        _mark(store, _unmarked(store, marked), marked)
        # Keep the doomed packs that hold a marked chunk (a later prune reconsiders
        # them). This walks the doomed packs' chunks, as dropping them does anyway.
        keep = store.index.packs_holding_marks(sorted(doomed))
        result.kept_for_new_snapshots = len(keep)
        doomed -= keep
        store.index.drop_packs(sorted(doomed))
        # Deleted under the lock too: a reconcile (which takes it) must not find these
        # files unindexed and index them again just before they go. (An object store
        # deletes up to a thousand in one request.)
        store.backend.remove_many("packs", sorted(doomed))
    result.deleted_packs = len(doomed & set(plan.delete))
    result.repacked_packs = len(doomed & set(plan.repack))
    store.index.end_marks()
    result.stale_temp_files = _remove_stale_temp_files(store)
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _remove_stale_temp_files(store: Store) -> int:
    """Partial packs of killed writers. A live writer's file is left alone: only files
    idle for a day, or any when no other writer is registered, go."""
    tmp = store.spool_dir
    if not tmp.is_dir():
        return 0
    others = [s for s in store.coordination.live_sessions() if s.get("kind") != "prune"]
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
    with store.coordination.exclusive("prune", what="prune") as job, \
            store.session("prune") as session:
        try:
            plan = plan_prune(store, own_session=session)
            if dry_run:
                return PruneResult(plan=plan)
            return execute_prune(store, plan, on_step, job)
        finally:
            store.index.end_marks()

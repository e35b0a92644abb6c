"""Check: is the store whole? If not, which packs are damaged and what do they hurt.

Without --read-data it checks structure (every pack present, trailer readable, every
chunk a snapshot names indexed). With --read-data it also reads every pack and verifies
every chunk against its BLAKE3 id, then maps bad chunks to the snapshots and files
that need them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from strata.errors import CorruptData, SnapshotNotFound
from strata.model.ids import content_id
from strata.model.snapshot import Snapshot
from strata.store.backend import ObjectNotFound
from strata.store.pack import parse_trailer
from strata.store.repository import Store

MAX_FILES_LISTED = 1000  # per snapshot, so a wrecked store still gives a readable report
_IDS_PER_QUERY_BATCH = 8192  # bounds memory however large one file's chunk list is


@dataclass
class CheckResult:
    ok: bool = True
    snapshots: int = 0
    packs: int = 0
    chunks_verified: int = 0
    damaged_packs: list[dict[str, Any]] = field(default_factory=list)  # {pack, reason}
    damaged_snapshots: list[dict[str, Any]] = field(default_factory=list)  # {snapshot, reason}
    missing_chunks: int = 0
    hurt: list[dict[str, Any]] = field(default_factory=list)  # {snapshot, files: [...], count}
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify_pack(store: Store, name: str, size: int) -> tuple[str | None, set[bytes]]:
    """Read a whole pack; return (reason it is damaged or None, ids of bad chunks)."""
    try:
        data = store.backend.load("packs", name)
    except OSError as exc:
        reason = "missing" if isinstance(exc, ObjectNotFound) else f"unreadable: {exc.strerror}"
        return reason, {e.id for e in store.index.pack_chunks(name)}
    indexed = store.index.pack_chunks(name)
    bad: set[bytes] = set()
    reasons = []
    if len(data) != size:
        reasons.append(f"size {len(data)} != {size} (truncated?)")
    if content_id(data).hex() != name:
        reasons.append("content does not match its name")
    try:
        entries = parse_trailer(data, len(data), store.cipher)
    except CorruptData as exc:
        reasons.append(f"trailer: {exc}")
        entries = indexed
    for e in entries:
        try:
            blob = data[e.offset:e.offset + e.length]
            if len(blob) != e.length:
                raise CorruptData("blob runs past the end of the pack")
            store.codec.decode(e.id, blob, e.raw_length)
        except CorruptData:
            bad.add(e.id)
    # Chunks the index places here but the trailer does not list are lost too.
    bad.update({e.id for e in indexed} - {e.id for e in entries})
    if bad and not reasons:
        reasons.append(f"{len(bad)} chunk(s) fail verification")
    return ("; ".join(reasons) or None), bad


def check(store: Store, *, read_data: bool = False,
          on_pack: Callable[[int], None] | None = None) -> CheckResult:
    res = CheckResult()
    # Packs the index lost (a writer killed before indexing, a power cut) still hold
    # their chunks: index them from their trailers first, as the next backup would.
    # Only trailers that cannot be read stay out, and the packs loop reports those.
    regained = store.reconcile_index()
    if regained:
        res.warnings.append(f"indexed {len(regained)} pack(s) left out of the index by an "
                            "interrupted writer")
    indexed = store.index.packs()
    on_disk = {}
    for name in store.backend.list("packs"):
        try:
            on_disk[name] = store.backend.stat("packs", name).size
        except ObjectNotFound:
            pass  # a prune running beside us removed it since we listed
    bad_chunks: set[bytes] = set()
    bad_packs: set[str] = set()

    def damage(name: str, reason: str, chunks: set[bytes]) -> None:
        if not store.index.has_pack(name):
            return  # a prune running beside us removed it since we listed: not damage
        res.damaged_packs.append({"pack": name, "reason": reason})
        bad_packs.add(name)
        bad_chunks.update(chunks)

    for name in sorted(set(on_disk) - set(indexed)):
        try:
            store.read_pack_trailer(name)  # else a writer indexed it a moment ago
        except (CorruptData, OSError):
            res.warnings.append(f"pack {name} is not indexed: its trailer is unreadable")
    for name, size in sorted(indexed.items()):
        res.packs += 1
        if name not in on_disk:
            damage(name, "missing", {e.id for e in store.index.pack_chunks(name)})
        elif read_data:
            reason, bad = verify_pack(store, name, size)
            res.chunks_verified += len(store.index.pack_chunks(name)) - len(bad)
            if reason:
                damage(name, reason, bad)
        else:
            try:
                if on_disk[name] != size:
                    raise CorruptData(f"size {on_disk[name]} != {size} (truncated?)")
                store.read_pack_trailer(name)
            except (CorruptData, OSError) as exc:
                damage(name, str(exc), {e.id for e in store.index.pack_chunks(name)})
        if on_pack:
            on_pack(size)

    check_snapshots(store, bad_chunks, res)
    res.ok = not (res.damaged_packs or res.damaged_snapshots or res.missing_chunks or res.hurt)
    return res


def check_snapshots(store: Store, bad_chunks: set[bytes], res: CheckResult) -> None:
    """Every snapshot's manifest and files against the index and `bad_chunks`: the
    damaged snapshots, and the files that need a chunk that is lost, into `res`."""
    for sid in store.snapshot_ids():
        res.snapshots += 1
        try:
            snap = store.load_snapshot(sid)
            _check_snapshot(store, snap, bad_chunks, res)
        except SnapshotNotFound:
            res.snapshots -= 1  # forgotten while we were checking
        except CorruptData as exc:
            res.damaged_snapshots.append({"snapshot": sid, "reason": str(exc)})


def _check_snapshot(store: Store, snap: Snapshot, bad_chunks: set[bytes],
                    res: CheckResult) -> None:
    mids = snap.manifest_chunk_ids()
    missing = set(store.missing_chunks(mids)) | (set(mids) & bad_chunks)
    if missing:
        res.missing_chunks += len(missing)
        raise CorruptData(f"its manifest is damaged ({len(missing)} chunk(s) lost)")
    files: list[str] = []
    count = 0
    batch: list[tuple[bytes, list[bytes]]] = []
    batch_ids = 0

    def flush() -> None:
        nonlocal count, batch_ids
        batch_ids = 0
        ids = [c for _, cs in batch for c in cs]
        lost = set(store.missing_chunks(ids))
        res.missing_chunks += len(lost)
        lost |= bad_chunks.intersection(ids)
        for path, cs in batch:
            if lost.intersection(cs):
                count += 1
                if len(files) < MAX_FILES_LISTED:
                    files.append(os.fsdecode(path))
        batch.clear()

    for entry in store.iter_manifest(snap):
        if entry.chunks:
            batch.append((entry.path, [c for c, _ in entry.chunks]))
            batch_ids += len(entry.chunks)
            if batch_ids >= _IDS_PER_QUERY_BATCH:
                flush()
    flush()
    if count:
        res.hurt.append({"snapshot": snap.id, "files": files, "count": count})

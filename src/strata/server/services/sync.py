"""The sync protocol: which chunks the server lacks, verified uploads, snapshot commits
that reference only chunks the server holds, and reading the endpoint's own snapshots
back for a file restore."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from strata.errors import CorruptData, Invalid
from strata.model.snapshot import Snapshot, now_iso
from strata.model.transfer import read_bundle
from strata.model.wire import CommitRequest, RestoreReport, SnapshotSummary, UploadResponse
from strata.server import metrics
from strata.server.catalog.models import Assignment, Endpoint, SnapshotRecord, Transaction
from strata.server.context import ServerContext
from strata.server.services import audit, snapshots
from strata.server.services.manifests import parse_chunk_ids, verify_manifest
from strata.store.pack import decode_payload

OWN_CVD = "this endpoint"  # how the agent's own CVD is named in its error messages


def missing(ctx: ServerContext, uploader: str, hex_ids: list[str]) -> list[str]:
    """Which of these chunks the server does not hold. Opens (or refreshes) the
    uploader's session, so a prune meanwhile spares what it is about to reference."""
    ids = parse_chunk_ids(hex_ids)
    ctx.touch_upload(uploader)
    return [c.hex() for c in ctx.store.missing_chunks(ids)]


def store_bundle(ctx: ServerContext, uploader: str, data: bytes) -> UploadResponse:
    """Verify every chunk of a bundle against its id before storing any of them; answer
    once they are durable and indexed."""
    ctx.touch_upload(uploader)
    try:
        chunks = list(read_bundle(data))
        for cid, raw_length, payload in chunks:
            decode_payload(cid, payload, raw_length)
    except CorruptData as exc:
        metrics.REJECTED_CHUNKS.inc()
        raise Invalid(f"upload rejected: {exc}") from None
    store = ctx.store
    stored = dup = nbytes = 0
    with store.claimed([cid for cid, _, _ in chunks]) as mine:
        for cid, raw_length, payload in chunks:
            if cid in mine:
                blob = store.codec.seal(cid, payload)
                mine.discard(cid)
                nbytes += store.put_claimed(cid, blob, raw_length)
                stored += 1
            else:
                dup += 1
                metrics.BYTES_DEDUPLICATED.inc(raw_length)
    store.flush()  # durable and indexed before we acknowledge
    return UploadResponse(chunks=len(chunks), stored=stored, duplicates=dup,
                          bytes_stored=nbytes)


def commit(ctx: ServerContext, ep: Endpoint, req: CommitRequest) -> str:
    """Record a snapshot of the endpoint; raises `MissingChunks` (the agent uploads them
    and retries) if it names a chunk the server does not hold."""
    try:
        verified = verify_manifest(ctx.store, req.manifest, req.manifest_id)
        with ctx.session() as db:
            cvd = snapshots.cvd_of(db, ep.id)
            assert cvd is not None
            parent = cvd.last_snapshot
        snap = Snapshot(time=now_iso(), host=ep.id, paths=req.paths, tags=req.tags,
                        trigger=req.trigger, manifest=req.manifest,
                        manifest_id=req.manifest_id, stats=req.stats, parent=parent)
        sid = ctx.store.commit_snapshot(snap, verified.referenced)
    except CorruptData as exc:
        raise Invalid(f"commit rejected: {exc}") from None
    _record_commit(ctx, ep, req, sid, snap.datetime)
    ctx.end_upload(ep.id)
    snapshots.uncache_head(ctx, ep.id)
    metrics.SNAPSHOTS.inc()
    audit.record(ctx, f"endpoint:{ep.id}", "commit-snapshot", sid, trigger=req.trigger)
    return sid


def _record_commit(ctx: ServerContext, ep: Endpoint, req: CommitRequest, sid: str,
                   time: datetime) -> None:
    """The catalog's side of a commit: the snapshot row, the CVD's head, the transaction."""
    stats = req.stats
    with ctx.write() as db:
        cvd = snapshots.cvd_of(db, ep.id)
        assert cvd is not None
        if db.get(SnapshotRecord, sid) is None:
            assignment = db.get(Assignment, ep.id)
            db.add(SnapshotRecord(id=sid, cvd_id=cvd.id, time=time, trigger=req.trigger,
                                  files=int(stats.get("files", 0)),
                                  bytes_total=int(stats.get("bytes_total", 0)),
                                  bytes_new=int(stats.get("bytes_new", 0)), tags=req.tags,
                                  layers=list(assignment.applied_layers) if assignment else []))
        cvd.last_snapshot = sid
        finished = datetime.now(UTC)
        db.add(Transaction(endpoint_id=ep.id, kind=req.kind, finished=finished,
                           started=finished - timedelta(seconds=max(0.0, req.seconds)),
                           snapshot=sid,
                           files_changed=int(stats.get("files_new", 0))
                           + int(stats.get("files_changed", 0)),
                           bytes_before_dedup=int(stats.get("bytes_read", 0)),
                           bytes_after_dedup=int(stats.get("bytes_new", 0)),
                           bytes_on_wire=req.bytes_on_wire, seconds=req.seconds, result="ok",
                           retries=req.retries))


def list_snapshots(ctx: ServerContext, ep: Endpoint) -> list[SnapshotSummary]:
    with ctx.session() as db:
        return [SnapshotSummary(id=s.id, time=s.time, trigger=s.trigger, files=s.files,
                                bytes_total=s.bytes_total, bytes_new=s.bytes_new, tags=s.tags)
                for s in snapshots.cvd_snapshots(db, ep.id)]


def own_snapshot(ctx: ServerContext, ep: Endpoint, ref: str) -> str:
    with ctx.session() as db:
        return snapshots.find_snapshot(db, ep.id, ref, owner=OWN_CVD).id


def snapshot_manifest(ctx: ServerContext, ep: Endpoint, ref: str) -> tuple[str, bytes]:
    """The id and manifest of one of the endpoint's own snapshots."""
    sid = own_snapshot(ctx, ep, ref)
    return sid, snapshots.manifest_bytes(ctx, sid)


def snapshot_chunks(ctx: ServerContext, ep: Endpoint, ref: str, hex_ids: list[str]) -> bytes:
    """Chunks of one of the endpoint's own snapshots, as a bundle of verified payloads."""
    return snapshots.chunk_bundle(ctx, own_snapshot(ctx, ep, ref), hex_ids)


def report_restore(ctx: ServerContext, ep: Endpoint, report: RestoreReport) -> None:
    """The agent's account of a file restore, for the transaction log."""
    sid = own_snapshot(ctx, ep, report.snapshot)
    with ctx.write() as db:
        finished = datetime.now(UTC)
        db.add(Transaction(endpoint_id=ep.id, kind="restore", finished=finished,
                           started=finished - timedelta(seconds=max(0.0, report.seconds)),
                           snapshot=sid, files_changed=report.files,
                           bytes_before_dedup=report.bytes_written,
                           bytes_on_wire=report.bytes_on_wire, seconds=report.seconds,
                           result=report.result, error=report.error))
    audit.record(ctx, f"endpoint:{ep.id}", "restore", sid, files=report.files,
                 result=report.result)


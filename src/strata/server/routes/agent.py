"""The agent API: enroll, check in, and the sync protocol (which chunks are missing,
upload them verified, commit a snapshot that references only chunks the server holds),
plus reading back the endpoint's own snapshots for file restore."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from strata.errors import CorruptData, MissingChunks, SnapshotNotFound
from strata.model.ids import ID_LEN, content_id
from strata.model.manifest import decode_manifest
from strata.model.snapshot import Snapshot, now_iso
from strata.model.transfer import BundleWriter, read_bundle
from strata.model.wire import (
    CheckinRequest,
    CheckinResponse,
    ChunkerSpec,
    ChunkRequest,
    CommitRequest,
    CommitResponse,
    EnrollRequest,
    EnrollResponse,
    MissingRequest,
    MissingResponse,
    RestoreReport,
    SnapshotSummary,
    UploadResponse,
)
from strata.server import metrics
from strata.server.auth import digest, new_secret
from strata.server.catalog.models import (
    Assignment,
    Cvd,
    Endpoint,
    EnrollmentToken,
    SnapshotRecord,
    Transaction,
)
from strata.server.context import ServerContext
from strata.server.deps import audit, get_ctx, require_device
from strata.server.layers import cached_desired, mark_applied
from strata.server.policies import agent_policy
from strata.store.pack import decode_payload

router = APIRouter(prefix="/api/v1/agent", tags=["agent"])


def _ids(hex_ids: list[str]) -> list[bytes]:
    try:
        out = [bytes.fromhex(h) for h in hex_ids]
    except ValueError:
        raise HTTPException(422, "chunk ids must be hex") from None
    if any(len(i) != ID_LEN for i in out):
        raise HTTPException(422, f"chunk ids must be {ID_LEN} bytes")
    return out


@router.post("/enroll", response_model=EnrollResponse)
def enroll(body: EnrollRequest, request: Request,
           ctx: ServerContext = Depends(get_ctx)) -> EnrollResponse:
    """Exchange a one-time enrollment token for a device credential."""
    now = datetime.now(UTC)
    with ctx.write() as db:
        # FOR UPDATE: another server process on the same PostgreSQL catalog waits here, so
        # a token's last use is spent once (SQLite has no row locks; its writers take turns).
        tok = db.scalar(select(EnrollmentToken).where(
            EnrollmentToken.token_hash == digest(body.token)).with_for_update())
        if tok is None or tok.revoked:
            raise HTTPException(401, "unknown or revoked enrollment token")
        expires = tok.expires_at
        if expires is not None and expires < now:
            raise HTTPException(401, "this enrollment token has expired")
        if tok.uses_left is not None:
            if tok.uses_left <= 0:
                raise HTTPException(401, "this enrollment token has been used up")
            tok.uses_left -= 1
        credential = new_secret("sdev")
        ep = Endpoint(id=str(uuid.uuid4()), hostname=body.hostname, os=body.os,
                      state="pending" if tok.require_approval else "active",
                      credential_hash=digest(credential), inventory=body.inventory,
                      token_id=tok.id, last_seen=now,
                      last_ip=request.client.host if request.client else "")
        db.add(ep)
        db.flush()  # the CVD row references the endpoint: insert that first
        db.add(Cvd(endpoint_id=ep.id))
        db.commit()
        state, eid = ep.state, ep.id
    audit(ctx, f"endpoint:{eid}", "enroll", eid, hostname=body.hostname, state=state)
    return EnrollResponse(endpoint_id=eid, credential=credential, state=state)


def _last_snapshot(ctx: ServerContext, endpoint_id: str) -> tuple[str | None, datetime | None]:
    def load() -> tuple[str | None, datetime | None]:
        with ctx.session() as db:
            cvd = db.scalar(select(Cvd).where(Cvd.endpoint_id == endpoint_id))
            last = db.get(SnapshotRecord, cvd.last_snapshot) if cvd and cvd.last_snapshot \
                else None
            return (last.id, last.time) if last else (None, None)
    return ctx.cached(f"last:{endpoint_id}", load)  # type: ignore[return-value]


@router.post("/checkin", response_model=CheckinResponse)
async def checkin(body: CheckinRequest, request: Request,
                  ep: Endpoint = Depends(require_device),
                  ctx: ServerContext = Depends(get_ctx)) -> CheckinResponse:
    # async: the common check-in touches only caches, so it runs on the event loop
    # instead of paying a thread hand-off; the rare writes are short.
    now = datetime.now(UTC)
    metrics.CHECKINS.inc()
    if body.inventory and body.inventory != ep.inventory:  # most check-ins change nothing
        with ctx.write() as db:
            row = db.get(Endpoint, ep.id)
            assert row is not None
            row.inventory = body.inventory
            row.hostname = str(body.inventory.get("hostname", row.hostname))
            row.os = str(body.inventory.get("os", row.os))
            ep.inventory, ep.hostname, ep.os = row.inventory, row.hostname, row.os
        ctx.invalidate()  # drivers follow the hardware: the desired state is recomputed
    with ctx.session() as db:
        policy = agent_policy(ctx, db, ep, now,
                              ip=request.client.host if request.client else "")
    last_id, last_time = _last_snapshot(ctx, ep.id)
    desired = cached_desired(ctx, ep)
    applied = body.status.get("applied_key")
    if desired is not None and applied == desired.key:
        ctx.cached(f"applied:{ep.id}:{applied}", lambda: mark_applied(ctx, ep.id, desired))
    cfg = ctx.store.config
    return CheckinResponse(
        endpoint_id=ep.id, state=ep.state, policy=policy,
        chunker=ChunkerSpec(min_size=cfg.chunker.min_size, avg_size=cfg.chunker.avg_size,
                            max_size=cfg.chunker.max_size, zstd_level=cfg.zstd_level or 3),
        last_snapshot=last_id, last_snapshot_time=last_time, server_time=now,
        desired=desired)


@router.post("/chunks/missing", response_model=MissingResponse)
def missing(body: MissingRequest, ep: Endpoint = Depends(require_device),
            ctx: ServerContext = Depends(get_ctx)) -> MissingResponse:
    """Which of these chunk ids the server does not hold (from any endpoint)."""
    ids = _ids(body.ids)
    ctx.touch_upload(ep.id)
    lacking = ctx.store.missing_chunks(ids)
    return MissingResponse(missing=[c.hex() for c in lacking])


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body larger than {limit} bytes")
    parts, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise HTTPException(413, f"body larger than {limit} bytes")
        parts.append(piece)
    return b"".join(parts)


def _store_bundle(ctx: ServerContext, data: bytes) -> UploadResponse:
    """Verify every chunk against its id before storing any of them."""
    try:
        chunks = list(read_bundle(data))
        for cid, raw_length, payload in chunks:
            decode_payload(cid, payload, raw_length)
    except CorruptData as exc:
        metrics.REJECTED_CHUNKS.inc()
        raise HTTPException(422, f"upload rejected: {exc}") from None
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


@router.post("/chunks", response_model=UploadResponse,
             openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}}})
async def upload(request: Request, ep: Endpoint = Depends(require_device),
                 ctx: ServerContext = Depends(get_ctx)) -> UploadResponse:
    """Upload a chunk bundle (binary body); acknowledged only once durable."""
    data = await _read_body(request, ctx.settings.max_upload_bytes)
    ctx.touch_upload(ep.id)
    return await run_in_threadpool(_store_bundle, ctx, data)


def _commit(ctx: ServerContext, ep: Endpoint, body: CommitRequest) -> str:
    store = ctx.store
    manifest = [(bytes.fromhex(h), n) for h, n in body.manifest]
    lacking = store.missing_chunks(c for c, _ in manifest)
    if lacking:
        raise MissingChunks(lacking)
    snap = Snapshot(time=now_iso(), host=ep.id, paths=body.paths, tags=body.tags,
                    trigger=body.trigger, manifest=body.manifest, manifest_id=body.manifest_id,
                    stats=body.stats)
    pieces = [store.load_chunk(c) for c, _ in manifest]
    if content_id(b"".join(pieces)).hex() != body.manifest_id:
        raise CorruptData("the manifest does not match its id")
    referenced: set[bytes] = {c for c, _ in manifest}
    for entry in decode_manifest(pieces):  # the pieces just read; validates every entry
        referenced.update(c for c, _ in entry.chunks)
    with ctx.session() as db:
        cvd = db.scalar(select(Cvd).where(Cvd.endpoint_id == ep.id))
        assert cvd is not None
        snap.parent = cvd.last_snapshot
    return store.commit_snapshot(snap, referenced)


@router.post("/snapshots", response_model=CommitResponse,
             responses={409: {"description": "chunks missing: upload them and retry"}})
def commit(body: CommitRequest, request: Request, ep: Endpoint = Depends(require_device),
           ctx: ServerContext = Depends(get_ctx)) -> CommitResponse | Response:
    """Commit a snapshot of this endpoint; refused (409) if it names a chunk not held."""
    try:
        _ids([h for h, _ in body.manifest])
        sid = _commit(ctx, ep, body)
    except MissingChunks as exc:
        return Response(status_code=409, media_type="application/json",
                        content=MissingResponse(missing=[c.hex() for c in exc.missing[:10_000]])
                        .model_dump_json())
    except CorruptData as exc:
        raise HTTPException(422, f"commit rejected: {exc}") from None
    snap = ctx.store.load_snapshot(sid)
    stats = body.stats
    with ctx.write() as db:
        cvd = db.scalar(select(Cvd).where(Cvd.endpoint_id == ep.id))
        assert cvd is not None
        if db.get(SnapshotRecord, sid) is None:
            assignment = db.get(Assignment, ep.id)
            db.add(SnapshotRecord(id=sid, cvd_id=cvd.id, time=snap.datetime, trigger=body.trigger,
                                  files=int(stats.get("files", 0)),
                                  bytes_total=int(stats.get("bytes_total", 0)),
                                  bytes_new=int(stats.get("bytes_new", 0)), tags=body.tags,
                                  layers=list(assignment.applied_layers) if assignment else []))
        cvd.last_snapshot = sid
        finished = datetime.now(UTC)
        db.add(Transaction(endpoint_id=ep.id, kind=body.kind, finished=finished,
                           started=finished - timedelta(seconds=max(0.0, body.seconds)),
                           snapshot=sid,
                           files_changed=int(stats.get("files_new", 0))
                           + int(stats.get("files_changed", 0)),
                           bytes_before_dedup=int(stats.get("bytes_read", 0)),
                           bytes_after_dedup=int(stats.get("bytes_new", 0)),
                           bytes_on_wire=body.bytes_on_wire, seconds=body.seconds, result="ok",
                           retries=body.retries))
        db.commit()
    ctx.end_upload(ep.id)
    ctx.uncache(f"last:{ep.id}")
    metrics.SNAPSHOTS.inc()
    audit(ctx, f"endpoint:{ep.id}", "commit-snapshot", sid, trigger=body.trigger)
    return CommitResponse(snapshot=sid)


def _own_snapshots(ctx: ServerContext, ep: Endpoint) -> list[SnapshotRecord]:
    with ctx.session() as db:
        cvd = db.scalar(select(Cvd).where(Cvd.endpoint_id == ep.id))
        if cvd is None:
            return []
        return list(db.scalars(select(SnapshotRecord).where(SnapshotRecord.cvd_id == cvd.id)
                               .order_by(SnapshotRecord.time)))


@router.get("/snapshots", response_model=list[SnapshotSummary])
def list_snapshots(ep: Endpoint = Depends(require_device),
                   ctx: ServerContext = Depends(get_ctx)) -> list[SnapshotSummary]:
    return [SnapshotSummary(id=s.id, time=s.time, trigger=s.trigger, files=s.files,
                            bytes_total=s.bytes_total, bytes_new=s.bytes_new, tags=s.tags)
            for s in _own_snapshots(ctx, ep)]


def _own_snapshot(ctx: ServerContext, ep: Endpoint, ref: str) -> str:
    snaps = _own_snapshots(ctx, ep)
    if ref == "latest" and snaps:
        return snaps[-1].id
    matches = [s.id for s in snaps if s.id.startswith(ref.lower())] if ref else []
    if len(matches) != 1:
        # Another endpoint's snapshot is reported exactly like one that does not exist.
        raise HTTPException(404, f"no snapshot {ref!r} for this endpoint")
    return matches[0]


@router.get("/snapshots/{ref}/manifest")
def get_manifest(ref: str, ep: Endpoint = Depends(require_device),
                 ctx: ServerContext = Depends(get_ctx)) -> Response:
    sid = _own_snapshot(ctx, ep, ref)
    try:
        snap = ctx.store.load_snapshot(sid)
        data = b"".join(ctx.store.load_chunk(c) for c in snap.manifest_chunk_ids())
    except (SnapshotNotFound, CorruptData) as exc:
        raise HTTPException(500, f"snapshot {sid[:8]} cannot be read: {exc}") from None
    return Response(content=data, media_type="application/octet-stream",
                    headers={"X-Strata-Snapshot": sid})


@router.post("/snapshots/{ref}/chunks")
def fetch_chunks(ref: str, body: ChunkRequest, ep: Endpoint = Depends(require_device),
                 ctx: ServerContext = Depends(get_ctx)) -> Response:
    """Chunks of one of the endpoint's own snapshots, as a bundle of verified payloads."""
    sid = _own_snapshot(ctx, ep, ref)
    allowed = ctx.snapshot_chunks(sid)
    ids = _ids(body.ids)
    if any(c not in allowed for c in ids):
        raise HTTPException(403, "a requested chunk is not part of this snapshot")
    out = BundleWriter()
    for cid in ids:
        payload, raw_length = ctx.store.load_payload(cid)  # verified on the way out
        out.add(cid, raw_length, payload)
    return Response(content=out.getvalue(), media_type="application/octet-stream")


@router.post("/transactions/restore")
def report_restore(body: RestoreReport, ep: Endpoint = Depends(require_device),
                   ctx: ServerContext = Depends(get_ctx)) -> dict:
    """The agent's account of a file restore, for the transaction log."""
    sid = _own_snapshot(ctx, ep, body.snapshot)
    with ctx.write() as db:
        finished = datetime.now(UTC)
        db.add(Transaction(endpoint_id=ep.id, kind="restore", finished=finished,
                           started=finished - timedelta(seconds=max(0.0, body.seconds)),
                           snapshot=sid, files_changed=body.files,
                           bytes_before_dedup=body.bytes_written,
                           bytes_on_wire=body.bytes_on_wire, seconds=body.seconds,
                           result=body.result, error=body.error))
    audit(ctx, f"endpoint:{ep.id}", "restore", sid, files=body.files, result=body.result)
    return {"recorded": True}

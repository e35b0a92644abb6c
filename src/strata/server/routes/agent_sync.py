"""Agent API: the sync protocol (which chunks are missing in this endpoint's view, upload
or prove them, commit a snapshot that references only chunks the endpoint holds), and
reading back the endpoint's own snapshots for a file restore."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from strata.errors import MissingChunks
from strata.model.possession import MAX_PROOFS
from strata.model.wire import (
    ChunkRequest,
    CommitRequest,
    CommitResponse,
    ManifestUploadResponse,
    MissingRequest,
    MissingResponse,
    ProveResponse,
    RestoreReport,
    SnapshotSummary,
    UploadResponse,
)
from strata.server.catalog.models import Endpoint
from strata.server.context import ServerContext
from strata.server.deps import AGENT_API, get_ctx, read_body, receive_bundle, require_device
from strata.server.services import sync

router = APIRouter(prefix=AGENT_API, tags=["agent"])
MAX_MISSING_LISTED = 10_000  # in a refused commit's answer
PROOF_BODY_LIMIT = 256 + 48 * MAX_PROOFS


@router.post("/chunks/missing", response_model=MissingResponse,
             responses={429: {"description": "too many chunk queries: retry after a while"}})
def missing(body: MissingRequest, ep: Endpoint = Depends(require_device),
            ctx: ServerContext = Depends(get_ctx)) -> MissingResponse:
    """Which of these chunks to upload, and which to prove, in this endpoint's view: a
    chunk only other endpoints hold reads as missing."""
    return sync.missing(ctx, ep, body.ids)


@router.post("/chunks/prove", response_model=ProveResponse,
             openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}}})
async def prove(request: Request, ep: Endpoint = Depends(require_device),
                ctx: ServerContext = Depends(get_ctx)) -> ProveResponse:
    """Keyed hashes of chunks the server asked this endpoint to prove it has (binary:
    strata.model.possession)."""
    with ctx.upload_slots.slot(ep.id, "uploads and proofs"):
        data = await read_body(request, PROOF_BODY_LIMIT)
        return await run_in_threadpool(sync.prove, ctx, ep, data)


@router.post("/chunks", response_model=UploadResponse,
             openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}}},
             responses={429: {"description": "this endpoint has uploads in flight already"}})
async def upload(request: Request, ep: Endpoint = Depends(require_device),
                 ctx: ServerContext = Depends(get_ctx)) -> UploadResponse:
    """Upload a chunk bundle (binary body); acknowledged only once durable. Each chunk
    is kept as soon as it arrives whole and verified: after a cut, only the rest is
    missing."""
    with ctx.upload_slots.slot(ep.id, "uploads"):  # before its body is read
        intake = sync.BundleIntake(ctx, ep.id)
        return await receive_bundle(request, intake, ctx.settings.max_upload_bytes)


@router.post("/manifests", response_model=ManifestUploadResponse,
             openapi_extra={"requestBody": {"content": {"application/x-strata-deltas": {}}}},
             responses={429: {"description": "this endpoint has uploads in flight already"}})
async def upload_manifest_delta(request: Request, base: str = Query(max_length=64),
                                ep: Endpoint = Depends(require_device),
                                ctx: ServerContext = Depends(get_ctx)
                                ) -> ManifestUploadResponse:
    """The manifest of the snapshot about to be committed, as a delta against the
    manifest of `base` (this endpoint's latest snapshot, or a layer it applied or is
    assigned); answered with its chunks, now held, for the commit to name."""
    with ctx.upload_slots.slot(ep.id, "uploads"):  # before its body is held in memory
        data = await read_body(request, sync.MAX_MANIFEST_DELTA_BODY)
        return await run_in_threadpool(sync.store_manifest_delta, ctx, ep, base, data)


@router.post("/snapshots", response_model=CommitResponse,
             responses={409: {"model": MissingResponse,
                              "description": "chunks missing: upload them and retry"}})
def commit(body: CommitRequest, ep: Endpoint = Depends(require_device),
           ctx: ServerContext = Depends(get_ctx)) -> CommitResponse | Response:
    """Commit a snapshot of this endpoint; refused (409) if it names a chunk not held."""
    try:
        return CommitResponse(snapshot=sync.commit(ctx, ep, body))
    except MissingChunks as exc:
        listed = MissingResponse(missing=[c.hex() for c in exc.missing[:MAX_MISSING_LISTED]])
        return Response(status_code=409, media_type="application/json",
                        content=listed.model_dump_json())


@router.get("/snapshots", response_model=list[SnapshotSummary])
def list_snapshots(ep: Endpoint = Depends(require_device),
                   ctx: ServerContext = Depends(get_ctx)) -> list[SnapshotSummary]:
    return sync.list_snapshots(ctx, ep)


@router.get("/snapshots/{ref}/manifest")
def get_manifest(ref: str, ep: Endpoint = Depends(require_device),
                 ctx: ServerContext = Depends(get_ctx)) -> Response:
    sid, data = sync.snapshot_manifest(ctx, ep, ref)
    return Response(content=data, media_type="application/octet-stream",
                    headers={"X-Strata-Snapshot": sid})


@router.post("/snapshots/{ref}/chunks")
def fetch_chunks(ref: str, body: ChunkRequest, ep: Endpoint = Depends(require_device),
                 ctx: ServerContext = Depends(get_ctx)) -> Response:
    """Chunks of one of the endpoint's own snapshots, as a bundle of verified payloads."""
    return Response(content=sync.snapshot_chunks(ctx, ep, ref, body.ids),
                    media_type="application/octet-stream")


@router.post("/transactions/restore")
def report_restore(body: RestoreReport, ep: Endpoint = Depends(require_device),
                   ctx: ServerContext = Depends(get_ctx)) -> dict[str, bool]:
    """The agent's account of a file restore, for the transaction log."""
    sync.report_restore(ctx, ep, body)
    return {"recorded": True}

"""The agent's side of layer updates: read the manifests of the layers (or snapshots) its
desired state names, download their chunks as one compressed stream, and report how the
update is going (assigned, downloading, ready, applied, failed)."""

from __future__ import annotations

from datetime import UTC, datetime

import zstandard
from fastapi import APIRouter, Depends, HTTPException, Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from strata.errors import CorruptData, SnapshotNotFound
from strata.model.transfer import pack_stream
from strata.model.update import UpdateState
from strata.model.wire import ChunkRequest, DesiredState
from strata.server.catalog.models import Assignment, Cvd, Endpoint
from strata.server.context import ServerContext
from strata.server.deps import audit, get_ctx, require_device
from strata.server.layers import cached_desired, set_state, snapshot_manifest_bytes
from strata.server.routes.agent import _ids

router = APIRouter(prefix="/api/v1/agent", tags=["agent"])

MAX_STREAM_BYTES = 64 << 20  # raw bytes in one download response
# zstd level of download streams: what crosses a WAN is what branch offices wait for, and
# the stream cache makes the cost of the top level a one-off per batch, not per endpoint.
DOWNLOAD_LEVEL = 19


def _allowed_snapshots(ctx: ServerContext, ep: Endpoint) -> set[str]:
    desired = cached_desired(ctx, ep)
    if desired is None:
        return set()
    return {dl.snapshot for dl in [*desired.layers, *(desired.owned or [])]}


def _check_snapshot(ctx: ServerContext, ep: Endpoint, sid: str) -> None:
    if sid not in _allowed_snapshots(ctx, ep):
        # Not assigned to this endpoint: reported like a layer that does not exist.
        raise HTTPException(404, f"no layer or snapshot {sid[:8]} assigned to this endpoint")


@router.get("/layers/{sid}/manifest")
def layer_manifest(sid: str, ep: Endpoint = Depends(require_device),
                   ctx: ServerContext = Depends(get_ctx)) -> Response:
    _check_snapshot(ctx, ep, sid)
    try:
        data = snapshot_manifest_bytes(ctx, sid)
    except (SnapshotNotFound, CorruptData) as exc:
        raise HTTPException(500, f"layer {sid[:8]} cannot be read: {exc}") from None
    # A manifest is highly redundant (paths, modes, ids): compressed it is a fraction.
    packed = zstandard.ZstdCompressor(level=19).compress(data)
    return Response(content=packed, media_type="application/zstd")


@router.post("/layers/chunks")
def layer_chunks(body: ChunkRequest, ep: Endpoint = Depends(require_device),
                 ctx: ServerContext = Depends(get_ctx)) -> Response:
    """Chunks of the endpoint's assigned layers, as one zstd stream. The server alone picks
    the level (a client asking for the costliest would be a denial of service) and keeps
    the stream: the next endpoint asking for the same batch costs no compression."""
    ids = _ids(body.ids)
    allowed: set[bytes] = set()
    for sid in _allowed_snapshots(ctx, ep):
        allowed |= ctx.snapshot_chunks(sid)
    if any(c not in allowed for c in ids):
        raise HTTPException(403, "a requested chunk is not part of this endpoint's layers")

    def make() -> bytes:
        chunks, total = [], 0
        for cid in ids:
            raw = ctx.store.load_chunk(cid)  # verified against its id on the way out
            total += len(raw)
            if total > MAX_STREAM_BYTES:
                raise HTTPException(413, f"ask for at most {MAX_STREAM_BYTES} bytes of "
                                         "chunks per request")
            chunks.append((cid, raw))
        return pack_stream(chunks, DOWNLOAD_LEVEL)

    body_bytes = ctx.streams.get_or_make(DOWNLOAD_LEVEL, ids, make)
    return Response(content=body_bytes, media_type="application/x-strata-stream")


class UpdateReport(BaseModel):
    key: str = Field(max_length=64)
    state: UpdateState
    percent: float = Field(default=0.0, ge=0, le=100)
    detail: str = Field(default="", max_length=4000)
    downloaded_bytes: int = Field(default=0, ge=0)
    refused: bool = False  # the agent refused the layers: unsigned, forged or stale


@router.post("/update")
def report_update(body: UpdateReport, ep: Endpoint = Depends(require_device),
                  ctx: ServerContext = Depends(get_ctx)) -> dict:
    """The agent's progress on its desired state; an outdated key is ignored."""
    desired = cached_desired(ctx, ep)
    if desired is None or desired.key != body.key:
        return {"recorded": False, "reason": "not the current desired state"}
    with ctx.write() as db:
        a = db.get(Assignment, ep.id)
        assert a is not None
        set_state(a, body.state, percent=body.percent, detail=body.detail)
        a.desired_key = body.key
        a.downloaded_bytes = body.downloaded_bytes
        if body.state is UpdateState.APPLIED:
            _applied(db, a, desired, ep)
    if body.state in (UpdateState.APPLIED, UpdateState.FAILED):
        ctx.invalidate()
        action = "layer-refused" if body.refused else f"update-{body.state}"
        audit(ctx, f"endpoint:{ep.id}", action, body.key, detail=body.detail[:500],
              operation=desired.operation)
    return {"recorded": True}


def _applied(db: object, a: Assignment, desired: DesiredState, ep: Endpoint) -> None:
    owned = desired.owned if desired.owned is not None else desired.layers
    a.applied_key = desired.key
    a.applied_layers = [dl.id for dl in owned if dl.id is not None]
    a.percent = 100.0
    if a.operation.get("kind") == "provision":
        # A provisioned endpoint starts a fresh CVD: its next snapshot has no parent.
        cvd = db.scalar(select(Cvd).where(Cvd.endpoint_id == ep.id))  # type: ignore[attr-defined]
        if cvd is not None:
            cvd.last_snapshot = None
    a.operation = {}  # a one-off operation is done; the layers stay assigned
    a.updated_at = datetime.now(UTC)

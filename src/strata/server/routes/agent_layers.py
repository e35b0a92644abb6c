"""Agent API: layer updates (the manifests of the layers or snapshots its desired state
names, their chunks as one compressed stream) and the agent's progress reports."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from strata.model.wire import ChunkRequest, UpdateReport
from strata.server.catalog.models import Endpoint
from strata.server.context import ServerContext
from strata.server.deps import AGENT_API, get_ctx, require_device
from strata.server.services import assignments, layer_downloads

router = APIRouter(prefix=AGENT_API, tags=["agent"])


@router.get("/layers/{sid}/manifest")
def layer_manifest(sid: str, ep: Endpoint = Depends(require_device),
                   ctx: ServerContext = Depends(get_ctx)) -> Response:
    return Response(content=layer_downloads.layer_manifest(ctx, ep, sid),
                    media_type="application/zstd")


@router.post("/layers/chunks")
def layer_chunks(body: ChunkRequest, ep: Endpoint = Depends(require_device),
                 ctx: ServerContext = Depends(get_ctx)) -> Response:
    """Chunks of the endpoint's assigned layers, as one zstd stream."""
    with ctx.download_slots.slot(ep.id, "layer downloads"):  # each may cost minutes of CPU
        return Response(content=layer_downloads.layer_chunks(ctx, ep, body.ids),
                        media_type="application/x-strata-stream")


@router.post("/update")
def report_update(body: UpdateReport, ep: Endpoint = Depends(require_device),
                  ctx: ServerContext = Depends(get_ctx)) -> dict[str, object]:
    """The agent's progress on its desired state; an outdated key is ignored."""
    if not assignments.report_progress(ctx, ep, key=body.key, state=body.state,
                                       percent=body.percent, detail=body.detail,
                                       downloaded_bytes=body.downloaded_bytes,
                                       refused=body.refused):
        return {"recorded": False, "reason": "not the current desired state"}
    return {"recorded": True}

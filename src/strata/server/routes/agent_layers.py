"""Agent API: layer updates (the manifests of the layers or snapshots its desired state
names, their chunks as one compressed stream) and the agent's progress reports."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fastapi import APIRouter, Depends, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

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
    """Chunks of the endpoint's assigned layers, as one zstd stream, sent as it is
    compressed. The download slot is held until the answer ends (each may cost minutes
    of CPU), hung up or not."""
    slot = contextlib.ExitStack()
    slot.enter_context(ctx.download_slots.slot(ep.id, "layer downloads"))
    try:
        pieces = layer_downloads.layer_chunk_stream(ctx, ep, body.ids)
    except BaseException:
        slot.close()
        raise

    def answer() -> Iterator[bytes]:
        try:
            yield from pieces
        finally:
            slot.close()
    # The background task runs when the client hung up midway too (the body then stops
    # being read, and its `finally` would wait for the garbage collector).
    return StreamingResponse(answer(), media_type="application/x-strata-stream",
                             background=BackgroundTask(slot.close))


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

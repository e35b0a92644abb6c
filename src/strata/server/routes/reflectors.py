"""Branch reflectors: the admin API (list, show, retire, reinstate; a layer exported for
offline seeding), the reflectors' own API (enroll, poll, chunk lists, chunks), and the
agents' (report a reflector they went around, renew a ticket)."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Depends, Header, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from strata.model.reflector import (
    ReflectorChunkRequest,
    ReflectorConfig,
    ReflectorEnrollRequest,
    ReflectorEnrollResponse,
    ReflectorInfo,
    ReflectorPoll,
    ReflectorProblem,
)
from strata.model.roles import Permission
from strata.model.transfer import MAGIC, bundle_record
from strata.model.wire import ReflectorRoute, SiteName
from strata.server.catalog.models import Endpoint, Reflector
from strata.server.context import ServerContext
from strata.server.deps import (
    AGENT_API,
    _bearer,
    admin_router,
    client_ip,
    get_ctx,
    require,
    require_device,
)
from strata.server.services import audit, reflectors
from strata.server.services.lookup import find_layer

REFLECTOR_API = "/api/v1/reflector"
router = admin_router("reflectors")
reflector_router = APIRouter(prefix=REFLECTOR_API, tags=["reflector"])
agent_router = APIRouter(prefix=AGENT_API, tags=["agent"])
VIEW = [Depends(require(Permission.VIEW))]


class StatusRequest(BaseModel):
    reason: str = Field(default="", max_length=500)


# -- administrators ---------------------------------------------------------------------------


@router.get("/reflectors", response_model=list[ReflectorInfo], dependencies=VIEW)
def list_reflectors(ctx: ServerContext = Depends(get_ctx)) -> list[ReflectorInfo]:
    """Every reflector: status, where agents reach it, what it fetched and served."""
    return reflectors.list_reflectors(ctx)


@router.get("/reflectors/{ref}", response_model=ReflectorInfo, dependencies=VIEW)
def show_reflector(ref: str, ctx: ServerContext = Depends(get_ctx)) -> ReflectorInfo:
    return reflectors.show_reflector(ctx, ref)


@router.post("/reflectors/{ref}/retire", response_model=ReflectorInfo)
def retire_reflector(ref: str, body: StatusRequest | None = None,
                     ctx: ServerContext = Depends(get_ctx),
                     actor: str = Depends(require(Permission.ENDPOINTS))) -> ReflectorInfo:
    """Out of rotation for good: its credential stops working at once."""
    return reflectors.set_status(ctx, ref, reflectors.RETIRED, actor=actor,
                                 reason=body.reason if body else "")


@router.post("/reflectors/{ref}/reinstate", response_model=ReflectorInfo)
def reinstate_reflector(ref: str, ctx: ServerContext = Depends(get_ctx),
                        actor: str = Depends(require(Permission.ENDPOINTS))) -> ReflectorInfo:
    """Back in rotation after a quarantine (once its cache is known to be sound)."""
    return reflectors.set_status(ctx, ref, reflectors.ACTIVE, actor=actor)


@router.get("/layers/{ref}/export", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
def export_layer(ref: str, ctx: ServerContext = Depends(get_ctx),
                 actor: str = Depends(require(Permission.LAYERS))) -> StreamingResponse:
    """Every chunk of a layer (its manifest's too) as one chunk bundle, streamed: what
    `strata reflector import` seeds a reflector's cache with, offline."""
    with ctx.session() as db:
        layer = find_layer(db, ref)
        sid, label = layer.snapshot, f"{layer.name}:{layer.version}"
    snap = ctx.store.load_snapshot(sid)
    audit.record(ctx, actor, "export-layer", label)

    def body() -> Iterator[bytes]:
        yield MAGIC
        sent: set[bytes] = set()
        pending: list[bytes] = list(snap.manifest_chunk_ids())
        for entry in ctx.store.iter_manifest(snap):
            pending.extend(c for c, _ in entry.chunks)
            if len(pending) >= 256:
                yield from _records(ctx, pending, sent)
                pending = []
        yield from _records(ctx, pending, sent)

    return StreamingResponse(body(), media_type="application/x-strata-bundle", headers={
        "Content-Disposition": f'attachment; filename="{label.replace(":", "_")}.strata"'})


def _records(ctx: ServerContext, ids: list[bytes], sent: set[bytes]) -> Iterator[bytes]:
    for cid in ids:
        if cid not in sent:
            sent.add(cid)
            payload, raw_length = ctx.store.load_payload(cid)  # verified on the way out
            yield bundle_record(cid, raw_length, payload)


# -- reflectors ---------------------------------------------------------------------------------


async def require_reflector(request: Request, authorization: str | None = Header(None),
                            ctx: ServerContext = Depends(get_ctx)) -> Reflector:
    try:
        return reflectors.reflector_for_credential(ctx, _bearer(authorization))
    except reflectors.ReflectorRefused as exc:
        raise HTTPException(401, str(exc)) from None


@reflector_router.post("/enroll", response_model=ReflectorEnrollResponse)
def enroll(body: ReflectorEnrollRequest, request: Request,
           ctx: ServerContext = Depends(get_ctx)) -> ReflectorEnrollResponse:
    """Trade a reflector enrollment token for a credential and the ticket key."""
    return reflectors.enroll(ctx, body, client_ip(request))


@reflector_router.post("/poll", response_model=ReflectorConfig)
def poll(body: ReflectorPoll, request: Request, refl: Reflector = Depends(require_reflector),
         ctx: ServerContext = Depends(get_ctx)) -> ReflectorConfig:
    """The reflector's counters in; its status and the layers to warm out."""
    return reflectors.poll(ctx, refl, body, client_ip(request))


class ChunkIdsRequest(BaseModel):
    ticket: str = Field(default="", max_length=16 << 10)


@reflector_router.post("/snapshots/{sid}/chunk-ids")
def chunk_ids(sid: str, body: ChunkIdsRequest, refl: Reflector = Depends(require_reflector),
              ctx: ServerContext = Depends(get_ctx)) -> Response:
    """The chunk ids a layer or snapshot needs (32 bytes each, zstd), for an endpoint's
    ticket, or for warm-up without one."""
    from strata.model.ids import is_hex_id

    if not is_hex_id(sid):
        raise HTTPException(422, "a snapshot id is 64 lowercase hex digits")
    return Response(reflectors.chunk_ids(ctx, refl, sid, body.ticket),
                    media_type="application/zstd")


@reflector_router.post("/snapshots/{sid}/check-chunks")
def check_chunks(sid: str, body: ReflectorChunkRequest,
                 refl: Reflector = Depends(require_reflector),
                 ctx: ServerContext = Depends(get_ctx)) -> dict[str, bool]:
    """Whether a ticket's endpoint may read these chunks of its own snapshot `sid` (a file
    restore through the reflector, checked per request)."""
    from strata.model.ids import is_hex_id

    if not is_hex_id(sid):
        raise HTTPException(422, "a snapshot id is 64 lowercase hex digits")
    reflectors.check_chunks(ctx, refl, sid, body.ids, body.ticket)
    return {"ok": True}


@reflector_router.post("/chunks")
def chunks(body: ReflectorChunkRequest, refl: Reflector = Depends(require_reflector),
           ctx: ServerContext = Depends(get_ctx)) -> Response:
    """Chunks a ticket (or the warm list) allows, as one zstd stream."""
    with ctx.download_slots.slot(f"reflector:{refl.id}", "reflector fetches"):
        data = reflectors.chunks(ctx, refl, body.ids, body.ticket, body.snapshot)
    return Response(content=data, media_type="application/x-strata-stream")


@reflector_router.post("/deltas/{did}")
def delta(did: str, body: ChunkIdsRequest, refl: Reflector = Depends(require_reflector),
          ctx: ServerContext = Depends(get_ctx)) -> Response:
    """A file delta's body, by id, for an endpoint's delta ticket that names it."""
    from strata.model.ids import is_hex_id

    if not is_hex_id(did):
        raise HTTPException(422, "a delta id is 64 lowercase hex digits")
    with ctx.download_slots.slot(f"reflector:{refl.id}", "reflector fetches"):
        data = reflectors.delta(ctx, refl, did, body.ticket)
    return Response(content=data, media_type="application/zstd")


# -- agents ---------------------------------------------------------------------------------------


class TicketRequest(BaseModel):
    site: SiteName | None = None
    subnet: str | None = Field(default=None, max_length=64)


@agent_router.post("/reflector-report")
def report(body: ReflectorProblem, ep: Endpoint = Depends(require_device),
           ctx: ServerContext = Depends(get_ctx)) -> dict[str, bool]:
    """The agent went around its reflector for a batch (down, slow, refused, corrupt)."""
    return {"recorded": reflectors.report_problem(ctx, ep, body)}


@agent_router.post("/reflector-ticket", response_model=ReflectorRoute | None)
def ticket(body: TicketRequest, request: Request, ep: Endpoint = Depends(require_device),
           ctx: ServerContext = Depends(get_ctx)) -> ReflectorRoute | None:
    """A fresh ticket (and route) between check-ins, for a download that outlived one."""
    site = body.site or str((ep.inventory or {}).get("site", ""))
    addresses = [a for a in (body.subnet, client_ip(request) or ep.last_ip) if a]
    return reflectors.renew_ticket(ctx, ep, site, addresses)


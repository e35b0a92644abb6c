"""Agent API: deltas of the changed files and manifests of a layer update
(server/services/deltas.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Response

from strata.model.reflector import DeltaOffer, DeltaOfferRequest, ManifestOfferRequest
from strata.model.wire import DeltaRequest
from strata.server.catalog.models import Endpoint
from strata.server.context import ServerContext
from strata.server.deps import AGENT_API, get_ctx, require_device
from strata.server.services import deltas

router = APIRouter(prefix=AGENT_API, tags=["agent"])


@router.post("/layers/deltas")
def file_deltas(body: DeltaRequest, ep: Endpoint = Depends(require_device),
                ctx: ServerContext = Depends(get_ctx)) -> Response:
    """Per group of changed files, a zstd delta from the versions the endpoint holds,
    where one pays; the groups left out are fetched by chunks."""
    return Response(content=deltas.file_deltas(ctx, ep, body.groups),
                    media_type="application/x-strata-deltas")


@router.post("/layers/delta-offer", response_model=DeltaOffer)
def delta_offer(body: DeltaOfferRequest, ep: Endpoint = Depends(require_device),
                ctx: ServerContext = Depends(get_ctx)) -> DeltaOffer:
    """The deltas of these groups by id and size, with a ticket naming them, for the
    agent to fetch from its branch reflector (docs/reflectors.md)."""
    return deltas.delta_offer(ctx, ep, body)


@router.get("/layers/{sid}/manifest-delta")
def manifest_delta(sid: str, base: str = Query(max_length=64),
                   ep: Endpoint = Depends(require_device),
                   ctx: ServerContext = Depends(get_ctx)) -> Response:
    """A layer manifest as a delta against one the endpoint holds (`base`: the layer's
    previous version); no record when a delta does not pay (the agent then fetches it
    whole)."""
    return Response(content=deltas.manifest_delta(ctx, ep, sid, base),
                    media_type="application/x-strata-deltas")


@router.post("/layers/{sid}/manifest-delta-offer", response_model=DeltaOffer)
def manifest_delta_offer(sid: str, body: ManifestOfferRequest,
                         ep: Endpoint = Depends(require_device),
                         ctx: ServerContext = Depends(get_ctx)) -> DeltaOffer:
    """A layer manifest's delta by id and size, with a ticket naming it, for the agent to
    fetch from its branch reflector; no delta when one does not pay."""
    return deltas.manifest_offer(ctx, ep, sid, body.base, body.reflectors)

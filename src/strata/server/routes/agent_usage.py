"""Agent API: the endpoint's learned boot and working sets (model/usage.py), sent after a
centralization and read back by a pipelined restore. Each endpoint reads only its own."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from strata.model.roles import Permission
from strata.model.usage import UsageSets
from strata.server.catalog.models import Endpoint
from strata.server.context import ServerContext
from strata.server.deps import AGENT_API, admin_router, get_ctx, require, require_device
from strata.server.services import usage

router = admin_router("endpoints")
agent_router = APIRouter(prefix=AGENT_API, tags=["agent"])


@agent_router.put("/usage")
def put_usage(body: UsageSets, ep: Endpoint = Depends(require_device),
              ctx: ServerContext = Depends(get_ctx)) -> dict[str, object]:
    """The boot set and working set this endpoint learned (replacing the last ones)."""
    return usage.store(ctx, ep, body)


@agent_router.get("/usage", response_model=UsageSets)
def get_usage(ep: Endpoint = Depends(require_device),
              ctx: ServerContext = Depends(get_ctx)) -> UsageSets:
    """This endpoint's sets: after a restore onto it, those of the CVD's old hardware."""
    return usage.of_endpoint(ctx, ep.id)


@router.get("/endpoints/{ref}/usage", dependencies=[Depends(require(Permission.VIEW))])
def usage_summary(ref: str, ctx: ServerContext = Depends(get_ctx)) -> dict[str, object]:
    """How many files the endpoint's boot set and working set hold, and when learned."""
    return usage.summary(ctx, ref)

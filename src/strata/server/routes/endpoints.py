"""Admin API: endpoints (list, detail, approve, revoke, tags)."""

from __future__ import annotations

from fastapi import Depends

from strata.model.admin import (
    EndpointDeleted,
    EndpointDetail,
    EndpointState,
    EndpointSummary,
    EndpointTags,
    TagsRequest,
)
from strata.model.roles import Permission
from strata.server.context import ServerContext
from strata.server.deps import admin_router, get_ctx, require
from strata.server.services import endpoints

router = admin_router("endpoints")
VIEW = [Depends(require(Permission.VIEW))]


@router.get("/endpoints", response_model=list[EndpointSummary], dependencies=VIEW)
def list_endpoints(pending: bool = False,
                   ctx: ServerContext = Depends(get_ctx)) -> list[EndpointSummary]:
    return endpoints.list_endpoints(ctx, pending)


@router.get("/endpoints/{ref}", response_model=EndpointDetail, dependencies=VIEW)
def show_endpoint(ref: str, ctx: ServerContext = Depends(get_ctx)) -> EndpointDetail:
    """Inventory, assignment, snapshots and recent transactions."""
    return endpoints.endpoint_detail(ctx, ref)


@router.post("/endpoints/{ref}/approve", response_model=EndpointState)
def approve(ref: str, ctx: ServerContext = Depends(get_ctx),
            actor: str = Depends(require(Permission.ENDPOINTS))) -> EndpointState:
    return endpoints.approve(ctx, ref, actor=actor)


@router.post("/endpoints/{ref}/revoke", response_model=EndpointState)
def revoke(ref: str, ctx: ServerContext = Depends(get_ctx),
           actor: str = Depends(require(Permission.ENDPOINTS))) -> EndpointState:
    return endpoints.revoke(ctx, ref, actor=actor)


@router.put("/endpoints/{ref}/tags", response_model=EndpointTags)
def set_tags(ref: str, body: TagsRequest, ctx: ServerContext = Depends(get_ctx),
             actor: str = Depends(require(Permission.ENDPOINTS))) -> EndpointTags:
    return endpoints.set_tags(ctx, ref, body, actor=actor)


@router.delete("/endpoints/{ref}", response_model=EndpointDeleted)
def delete_endpoint(ref: str, ctx: ServerContext = Depends(get_ctx),
                    actor: str = Depends(require(Permission.ENDPOINTS))) -> EndpointDeleted:
    """The endpoint and its CVD (every snapshot); its credential stops working."""
    return endpoints.delete_endpoint(ctx, ref, actor=actor)

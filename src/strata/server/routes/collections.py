"""Admin API: collections of endpoints, and assigning layers to endpoints, a collection
or all."""

from __future__ import annotations

from fastapi import Depends

from strata.model.admin import (
    AssignRequest,
    AssignResult,
    CollectionInfo,
    CollectionRequest,
    Deleted,
)
from strata.model.roles import Permission
from strata.server.context import ServerContext
from strata.server.deps import admin_router, get_ctx, require, signing_required
from strata.server.services import assignments, collections

router = admin_router("collections")


@router.post("/collections", response_model=CollectionInfo)
def save_collection(body: CollectionRequest, ctx: ServerContext = Depends(get_ctx),
                    actor: str = Depends(require(Permission.COLLECTIONS))) -> CollectionInfo:
    return collections.save_collection(ctx, body, actor=actor)


@router.get("/collections", response_model=list[CollectionInfo],
            dependencies=[Depends(require(Permission.VIEW))])
def list_collections(ctx: ServerContext = Depends(get_ctx)) -> list[CollectionInfo]:
    return collections.list_collections(ctx)


@router.delete("/collections/{name}", response_model=Deleted)
def delete_collection(name: str, ctx: ServerContext = Depends(get_ctx),
                      actor: str = Depends(require(Permission.COLLECTIONS))) -> Deleted:
    return collections.delete_collection(ctx, name, actor=actor)


@router.post("/assign", response_model=AssignResult,
             dependencies=[Depends(require(Permission.ASSIGN)),
                           Depends(signing_required)])
def assign(body: AssignRequest, ctx: ServerContext = Depends(get_ctx),
           actor: str = Depends(require(Permission.ASSIGN))) -> AssignResult:
    return assignments.assign(ctx, body, actor=actor)

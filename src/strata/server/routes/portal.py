"""Admin API: file portal accounts for end users, set up by the help desk."""

from __future__ import annotations

from fastapi import Depends

from strata.model.admin import Deleted
from strata.model.roles import Permission
from strata.model.users import PortalAccountInfo, PortalAccountRequest
from strata.server.context import ServerContext
from strata.server.deps import admin_router, get_ctx, require
from strata.server.services import portal

# Setting up a user's access to their own files is part of restoring files.
router = admin_router("portal", Permission.RESTORE)
HELP_DESK = Depends(require(Permission.RESTORE))


@router.post("/endpoints/{ref}/portal-accounts", response_model=PortalAccountInfo)
def create_account(ref: str, body: PortalAccountRequest, ctx: ServerContext = Depends(get_ctx),
                   actor: str = HELP_DESK) -> PortalAccountInfo:
    """An end user's account: their endpoint's snapshots, their own folder in them."""
    return portal.create_account(ctx, ref, body, actor=actor)


@router.get("/portal-accounts", response_model=list[PortalAccountInfo])
def list_accounts(endpoint: str = "",
                  ctx: ServerContext = Depends(get_ctx)) -> list[PortalAccountInfo]:
    return portal.list_accounts(ctx, endpoint)


@router.delete("/portal-accounts/{name}", response_model=Deleted)
def delete_account(name: str, ctx: ServerContext = Depends(get_ctx),
                   actor: str = HELP_DESK) -> Deleted:
    return portal.delete_account(ctx, name, actor=actor)

"""Admin API: file portal accounts for end users, set up by the help desk."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from strata.model.admin import Deleted
from strata.model.roles import Permission
from strata.model.users import (
    PortalAccountInfo,
    PortalAccountRequest,
    PortalPasswordRequest,
    PortalPasswordSet,
)
from strata.server.catalog.models import Endpoint
from strata.server.context import ServerContext
from strata.server.deps import AGENT_API, admin_router, get_ctx, require, require_device
from strata.server.services import portal, portal_self

# Setting up a user's access to their own files is part of restoring files.
router = admin_router("portal", Permission.RESTORE)
HELP_DESK = Depends(require(Permission.RESTORE))
# The end user's own way in: through their endpoint's agent (its credential).
agent_router = APIRouter(prefix=AGENT_API, tags=["agent"])


@agent_router.post("/portal-password", response_model=PortalPasswordSet)
def set_own_password(body: PortalPasswordRequest, ep: Endpoint = Depends(require_device),
                     ctx: ServerContext = Depends(get_ctx)) -> PortalPasswordSet:
    """A user of this endpoint sets their portal password (account on this endpoint
    only, folder in its user data)."""
    return portal_self.set_own_password(ctx, ep, body)


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

"""Admin API: enrollment tokens."""

from __future__ import annotations

from fastapi import Depends

from strata.model.admin import TokenCreated, TokenRequest
from strata.model.roles import Permission
from strata.server.context import ServerContext
from strata.server.deps import admin_router, get_ctx, require
from strata.server.services import credentials

router = admin_router("tokens")


@router.post("/tokens", response_model=TokenCreated)
def create_token(body: TokenRequest, ctx: ServerContext = Depends(get_ctx),
                 actor: str = Depends(require(Permission.TOKENS))) -> TokenCreated:
    """A token agents enroll with (shown once)."""
    return credentials.create_enrollment_token(ctx, body, actor=actor)

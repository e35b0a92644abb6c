"""Admin API: enrollment tokens, and the admin token's rotation."""

from __future__ import annotations

from fastapi import Depends, Request

from strata.model.admin import AdminTokenRotated, TokenCreated, TokenInfo, TokenRequest
from strata.model.roles import Permission
from strata.server.context import ServerContext
from strata.server.deps import admin_router, get_ctx, require, require_admin
from strata.server.services import audit, credentials

router = admin_router("tokens")


@router.post("/tokens", response_model=TokenCreated)
def create_token(body: TokenRequest, ctx: ServerContext = Depends(get_ctx),
                 actor: str = Depends(require(Permission.TOKENS))) -> TokenCreated:
    """A token agents enroll with (shown once)."""
    return credentials.create_enrollment_token(ctx, body, actor=actor)


@router.get("/tokens", response_model=list[TokenInfo])
def list_tokens(all: bool = False, ctx: ServerContext = Depends(get_ctx),
                _: str = Depends(require(Permission.TOKENS))) -> list[TokenInfo]:
    """Enrollment tokens that still enroll (`all`: expired, used up and revoked too)."""
    return credentials.list_enrollment_tokens(ctx, all_tokens=all)


@router.post("/tokens/{token_id}/revoke", response_model=TokenInfo)
def revoke_token(token_id: int, ctx: ServerContext = Depends(get_ctx),
                 actor: str = Depends(require(Permission.TOKENS))) -> TokenInfo:
    """No endpoint enrolls with this token any more."""
    return credentials.revoke_enrollment_token(ctx, token_id, actor=actor)


@router.post("/admin-token/rotate", response_model=AdminTokenRotated)
def rotate_admin_token(request: Request, ctx: ServerContext = Depends(get_ctx),
                       actor: str = Depends(require_admin)) -> AdminTokenRotated:
    """A new admin token, written to DATA/admin.token and in force at once: the old one
    is refused from the next request."""
    path = request.app.state.admin_token_path
    token = credentials.rotate_admin_token(path)  # every process reads the new file
    audit.record(ctx, actor, "rotate-admin-token", "admin")
    return AdminTokenRotated(token=token, path=str(path))

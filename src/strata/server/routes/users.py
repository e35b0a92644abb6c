"""Admin API: IT staff accounts, their personal API tokens, and who is calling."""

from __future__ import annotations

from fastapi import Depends

from strata.model.admin import Deleted
from strata.model.roles import Permission
from strata.model.users import (
    Caller,
    PasswordRequest,
    RoleRequest,
    UserInfo,
    UserRequest,
    UserTokenCreated,
    UserTokenInfo,
    UserTokenRequest,
)
from strata.server.context import ServerContext
from strata.server.deps import admin_router, current_staff, get_ctx, require
from strata.server.services import users
from strata.server.services.users import Staff

router = admin_router("users")
USERS = Depends(require(Permission.USERS))


@router.get("/me", response_model=Caller, dependencies=[Depends(require(Permission.VIEW))])
def whoami(staff: Staff = Depends(current_staff)) -> Caller:
    """The caller's name, role and permissions."""
    return staff.caller()


@router.post("/users", response_model=UserInfo)
def create_user(body: UserRequest, ctx: ServerContext = Depends(get_ctx),
                actor: str = USERS) -> UserInfo:
    return users.create_user(ctx, body, actor=actor)


@router.get("/users", response_model=list[UserInfo], dependencies=[USERS])
def list_users(ctx: ServerContext = Depends(get_ctx)) -> list[UserInfo]:
    return users.list_users(ctx)


@router.delete("/users/{name}", response_model=Deleted)
def delete_user(name: str, ctx: ServerContext = Depends(get_ctx),
                actor: str = USERS) -> Deleted:
    """The account, its console sessions and its API tokens."""
    return users.delete_user(ctx, name, actor=actor)


@router.put("/users/{name}/password", response_model=UserInfo)
def set_password(name: str, body: PasswordRequest, ctx: ServerContext = Depends(get_ctx),
                 actor: str = USERS) -> UserInfo:
    """A new password; the user's console sessions end."""
    return users.set_password(ctx, name, body.password, actor=actor)


@router.put("/users/{name}/role", response_model=UserInfo)
def set_role(name: str, body: RoleRequest, ctx: ServerContext = Depends(get_ctx),
             actor: str = USERS) -> UserInfo:
    """Another role, in force from the user's next request."""
    return users.set_role(ctx, name, body.role, actor=actor)


@router.post("/users/{name}/tokens", response_model=UserTokenCreated)
def create_token(name: str, body: UserTokenRequest, ctx: ServerContext = Depends(get_ctx),
                 actor: str = USERS) -> UserTokenCreated:
    """A personal API token for the CLI and scripts (shown once)."""
    return users.create_token(ctx, name, body.label, actor=actor)


@router.get("/users/{name}/tokens", response_model=list[UserTokenInfo], dependencies=[USERS])
def list_tokens(name: str, ctx: ServerContext = Depends(get_ctx)) -> list[UserTokenInfo]:
    return users.list_tokens(ctx, name)


@router.delete("/users/{name}/tokens/{token_id}", response_model=UserTokenInfo)
def revoke_token(name: str, token_id: int, ctx: ServerContext = Depends(get_ctx),
                 actor: str = USERS) -> UserTokenInfo:
    return users.revoke_token(ctx, name, token_id, actor=actor)

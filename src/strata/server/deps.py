"""What every route shares: the context, who is calling (an administrator or an enrolled
device), and reading a bounded request body."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from starlette.requests import ClientDisconnect

from strata.errors import StrataError, TooLarge
from strata.server.auth import same_secret
from strata.server.catalog.models import Endpoint
from strata.server.context import ServerContext
from strata.server.services.credentials import device_for_credential

log = logging.getLogger("strata.server")

ADMIN_API = "/api/v1/admin"
AGENT_API = "/api/v1/agent"


def get_ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


def client_ip(request: Request) -> str:
    return request.client.host if request.client else ""


def _bearer(authorization: str | None) -> str:
    if not authorization or not authorization.startswith("Bearer "):
        raise HTTPException(401, "missing credentials: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    return authorization[len("Bearer "):].strip()


def require_admin(request: Request, authorization: str | None = Header(None)) -> str:
    """The calling administrator, as the audit log names them."""
    token = _bearer(authorization)
    if not same_secret(token, request.app.state.admin_digest):
        raise HTTPException(403, "this token is not an admin token")
    return "admin"


def admin_router(tag: str) -> APIRouter:
    """A router of the admin API: every route in it needs an administrator."""
    return APIRouter(prefix=ADMIN_API, tags=[tag], dependencies=[Depends(require_admin)])


async def require_device(request: Request, authorization: str | None = Header(None),
                         ctx: ServerContext = Depends(get_ctx)) -> Endpoint:
    """The calling endpoint, which must be enrolled and approved. Runs on the event loop:
    it is a cache lookup nearly always, cheaper than a hop to the thread pool."""
    ep = device_for_credential(ctx, _bearer(authorization))
    if ep is None:
        raise HTTPException(401, "unknown device credential: enroll this endpoint again")
    if ep.state == "revoked":
        raise HTTPException(403, "this endpoint's access was revoked by an administrator")
    if ep.state == "pending":
        raise HTTPException(403, "this endpoint is waiting for an administrator's approval")
    ctx.mark_seen(ep.id, client_ip(request))
    request.state.endpoint_id = ep.id
    return ep


NO_SIGNING = ("layer signing is not set up on this server: run `strata signing init --keys "
              "DIR` on the image manager's workstation first (see docs/security.md)")


def signing_required(request: Request) -> None:
    """For the routes that send layers to endpoints: agents accept only signed layers, so
    without signing such an assignment could never be carried out."""
    if not get_ctx(request).signing.initialized:
        raise HTTPException(409, NO_SIGNING)


class ClientGone(StrataError):
    """The client closed the connection mid-request (nobody reads the answer)."""

    http_status = 400


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"body larger than {limit} bytes")
    parts, size = [], 0
    try:
        async for piece in request.stream():
            size += len(piece)
            if size > limit:
                raise TooLarge(f"body larger than {limit} bytes")
            parts.append(piece)
    except ClientDisconnect:
        # Routine (a laptop closed, a network change): one line, not a traceback.
        client = request.client.host if request.client else "?"
        log.warning("client %s went away during %s after %d bytes", client, request.url.path,
                 size)
        raise ClientGone("the client disconnected before its request was complete") from None
    return b"".join(parts)

"""FastAPI dependencies: the shared context and who is calling (admin or a device)."""

from __future__ import annotations

from fastapi import Depends, Header, HTTPException, Request
from sqlalchemy import select

from strata.server.auth import digest, same_secret
from strata.server.catalog.models import AuditEntry, Endpoint
from strata.server.context import ServerContext


def get_ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


def _bearer(authorization: str | None) -> str:
    if not authorization or not authorization.startswith("Bearer "):
        raise HTTPException(401, "missing credentials: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    return authorization[len("Bearer "):].strip()


def require_admin(request: Request, authorization: str | None = Header(None),
                  ctx: ServerContext = Depends(get_ctx)) -> str:
    token = _bearer(authorization)
    if not same_secret(token, request.app.state.admin_digest):
        raise HTTPException(403, "this token is not an admin token")
    return "admin"


async def require_device(request: Request, authorization: str | None = Header(None),
                         ctx: ServerContext = Depends(get_ctx)) -> Endpoint:
    """The calling endpoint, which must be enrolled and approved. Runs on the event loop:
    it is a cache lookup nearly always, cheaper than a hop to the thread pool."""
    token = _bearer(authorization)
    key = digest(token)

    def load() -> Endpoint | None:
        with ctx.session() as db:
            row = db.scalar(select(Endpoint).where(Endpoint.credential_hash == key))
            if row is not None:
                db.expunge(row)
            return row
    ep = ctx.cached(f"device:{key}", load)
    if ep is None:
        raise HTTPException(401, "unknown device credential: enroll this endpoint again")
    if ep.state == "revoked":
        raise HTTPException(403, "this endpoint's access was revoked by an administrator")
    if ep.state == "pending":
        raise HTTPException(403, "this endpoint is waiting for an administrator's approval")
    ctx.mark_seen(ep.id, request.client.host if request.client else "")
    request.state.endpoint_id = ep.id
    return ep


NO_SIGNING = ("layer signing is not set up on this server: run `strata signing init --keys "
              "DIR` on the image manager's workstation first (see docs/security.md)")


def signing_required(ctx: ServerContext = Depends(get_ctx)) -> None:
    """For the routes that send layers to endpoints: agents accept only signed layers, so
    without signing such an assignment could never be carried out."""
    if not ctx.signing.initialized:
        raise HTTPException(409, NO_SIGNING)


def audit(ctx: ServerContext, actor: str, action: str, target: str = "",
          **detail: object) -> None:
    with ctx.write() as db:
        db.add(AuditEntry(actor=actor, action=action, target=target, detail=detail))
        db.commit()

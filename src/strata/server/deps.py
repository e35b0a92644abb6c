"""What every route shares: the context, who is calling (an administrator or an enrolled
device), and reading a bounded request body."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any, Protocol, TypeVar

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute

from strata.errors import Invalid, StrataError, TooLarge
from strata.model.roles import POLICY_PERMISSION, Permission
from strata.model.wire import UploadResponse
from strata.server.auth import same_secret
from strata.server.catalog.models import Endpoint
from strata.server.context import ServerContext
from strata.server.read_cache import NeedsLoad, hits_only
from strata.server.services.credentials import device_for_credential
from strata.server.services.users import BREAK_GLASS_STAFF, Staff, staff_for_token

log = logging.getLogger("strata.server")
T = TypeVar("T")
ADMIN_API = "/api/v1/admin"
AGENT_API = "/api/v1/agent"


def context_of(request: Request) -> ServerContext:
    return request.app.state.ctx


async def get_ctx(request: Request) -> ServerContext:
    """The dependency. async: FastAPI would run a plain function in the thread pool, a
    hand-off that cost every request (a check-in most of all) more than the lookup."""
    return context_of(request)


def client_ip(request: Request) -> str:
    return request.client.host if request.client else ""


def _bearer(authorization: str | None) -> str:
    if not authorization or not authorization.startswith("Bearer "):
        raise HTTPException(401, "missing credentials: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    return authorization[len("Bearer "):].strip()


def current_staff(request: Request, authorization: str | None = Header(None)) -> Staff:
    """Who is calling the admin API: the break-glass admin.token, or a user's personal API
    token. FastAPI computes it once per request, however many dependencies ask."""
    token = _bearer(authorization)
    if same_secret(token, request.app.state.admin_token.digest()):
        staff = BREAK_GLASS_STAFF
    else:
        found = staff_for_token(context_of(request), token)
        if found is None:
            raise HTTPException(403, "this token is not an admin token or a user's API token")
        staff = found
    request.state.staff = staff
    if request.scope.get("endpoint") in _UNDECLARED and not staff.may(Permission.SERVER):
        raise HTTPException(403, f"your role ({staff.role}) does not allow this: the route "
                            "declares no permission, so it is for administrators only")
    return staff


class Needs:
    """A route's permission: as a dependency, the calling user's audit name, if their role
    grants `permission` (403 otherwise). Every admin route declares one (checked when the
    app is built, and listed as `x-permission` in the OpenAPI document)."""

    def __init__(self, permission: Permission):
        self.permission = permission

    def __call__(self, staff: Staff = Depends(current_staff)) -> str:
        if not staff.may(self.permission):
            raise HTTPException(403, f"your role ({staff.role}) does not allow this: it needs "
                                f"the {self.permission.value!r} permission")
        return staff.actor


_NEEDS: dict[Permission, Needs] = {}


def require(permission: Permission) -> Needs:
    """One instance per permission, so that FastAPI checks it once per request when a
    route names it twice (before `signing_required`, and for the actor's name)."""
    return _NEEDS.setdefault(permission, Needs(permission))


# Administrators only: server configuration that no narrower role owns.
require_admin = require(Permission.SERVER)


def policy_permission(kind: str, staff: Staff = Depends(current_staff)) -> str:
    """Policies belong to two roles: upload, retention and bandwidth to protection
    managers, the layer rules to image managers. An unknown kind is the route's 404."""
    needed = POLICY_PERMISSION.get(kind)
    if needed is not None and not staff.may(needed):
        raise HTTPException(403, f"your role ({staff.role}) does not allow this: it needs "
                            f"the {needed.value!r} permission")
    return staff.actor


def admin_router(tag: str, permission: Permission | None = None) -> APIRouter:
    """A router of the admin API: every route in it needs a known caller, and the
    permission: `permission` for all of them, or each route names its own
    (`Depends(require(Permission.X))`)."""
    deps = [Depends(current_staff if permission is None else Needs(permission))]
    return APIRouter(prefix=ADMIN_API, tags=[tag], dependencies=deps)


# The handlers of admin routes that named no permission: administrators only, until they
# do (default deny; tests/test_users_roles.py fails on each of them).
_UNDECLARED: set[Callable[..., Any]] = set()


def label_permissions(routes: list[BaseRoute]) -> None:
    """List each admin route's permission as `x-permission` in the OpenAPI document (a
    permission, or per policy kind a permission), where the role tests read them. A route
    that declares none is kept for administrators (`server`), flagged
    `x-permission-undeclared`, and logged."""
    for route in routes:
        if not isinstance(route, APIRoute) or not route.path.startswith(ADMIN_API + "/"):
            continue
        found = _permission_of(route.dependant)
        if found is None:
            log.warning("admin route %s %s declares no permission: administrators only",
                        sorted(route.methods or ()), route.path)
            _UNDECLARED.add(route.endpoint)
            found = Permission.SERVER.value
            route.openapi_extra = {**(route.openapi_extra or {}),
                                   "x-permission-undeclared": True}
        route.openapi_extra = {**(route.openapi_extra or {}), "x-permission": found}


def _permission_of(dependant: Dependant) -> str | dict | None:
    for sub in dependant.dependencies:
        if isinstance(sub.call, Needs):
            return sub.call.permission.value
        if sub.call is policy_permission:
            return {"kind": {k: v.value for k, v in POLICY_PERMISSION.items()}}
        found = _permission_of(sub)
        if found is not None:
            return found
    return None


async def on_loop_if_cached(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on the event loop when the values it reads are all cached, else in a
    worker thread: a catalog query on the loop would hold every other request behind
    it (with a PostgreSQL catalog, the server then idled at a third of a core while
    check-ins queued for seconds). `fn` must be safe to run again after a NeedsLoad
    (read_cache.hits_only)."""
    try:
        with hits_only():
            return fn(*args)
    except NeedsLoad:
        pass
    return await run_in_threadpool(fn, *args)


async def require_device(request: Request, authorization: str | None = Header(None),
                         ctx: ServerContext = Depends(get_ctx)) -> Endpoint:
    """The calling endpoint, which must be enrolled and approved. Runs on the event loop:
    it is a cache lookup nearly always, cheaper than a hop to the thread pool (which a
    miss takes, to wait for the catalog there)."""
    ep = await on_loop_if_cached(device_for_credential, ctx, _bearer(authorization))
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
    if not context_of(request).signing.initialized:
        raise HTTPException(409, NO_SIGNING)


class ClientGone(StrataError):
    """The client closed the connection mid-request (nobody reads the answer)."""

    http_status = 400


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it passes `limit` bytes."""
    return b"".join([piece async for piece in body_pieces(request, limit)])


async def body_pieces(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The body as it arrives, refused (413) as soon as it passes `limit` bytes; a client
    that goes away midway is a ClientGone, after the pieces that did arrive."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"body larger than {limit} bytes")
    size = 0
    try:
        async for piece in request.stream():
            size += len(piece)
            if size > limit:
                raise TooLarge(f"body larger than {limit} bytes")
            yield piece
    except ClientDisconnect:
        # Routine (a laptop closed, a network change): one line, not a traceback.
        log.warning("%s went away during %s %s after %d bytes",
                    client_ip(request) or "a client", request.method, request.url.path, size)
        raise ClientGone("the client disconnected before its request was complete") from None


class BundleSink(Protocol):
    """What takes in an upload's chunk bundle (services/sync.py: BundleIntake)."""

    kept: int  # chunks verified so far: settling them makes them durable

    def feed(self, data: bytes) -> None: ...
    def check(self, data: bytes) -> None: ...
    def end(self) -> None: ...
    def settle(self) -> UploadResponse: ...


FEED_BYTES = 1 << 20  # body gathered before it is decoded and stored (one thread hand-off)
INLINE_BYTES = 64 << 10  # less than this is checked at once, with no hand-off


async def receive_bundle(request: Request, intake: BundleSink,
                         limit: int) -> UploadResponse:
    """Feed a bundle's body to `intake` as it arrives, and settle it however the body
    ends: whole, cut short (the client went away, stalled, or passed `limit`) or refused
    at a bad record. What arrived whole and verified is durable and the uploader's before
    anything is answered; then the error, if any, is raised.

    The store's and the catalog's I/O runs in the thread pool. Less than INLINE_BYTES
    left at the end is only verified at once (stored by the settle), and a settle with
    nothing to make durable is done at once: a client that goes away leaves its upload
    slot as soon as it did before uploads kept their chunks."""
    gathered: list[bytes] = []
    held = 0

    async def feed(data: bytes) -> None:
        if len(data) < INLINE_BYTES:
            intake.check(data)  # verified: stored by the settle
        else:
            await run_in_threadpool(intake.feed, data)

    async def settle() -> UploadResponse:
        return await run_in_threadpool(intake.settle) if intake.kept else intake.settle()

    try:
        async with contextlib.aclosing(body_pieces(request, limit)) as pieces:
            async for piece in pieces:
                gathered.append(piece)
                held += len(piece)
                if held >= FEED_BYTES:
                    data, gathered, held = b"".join(gathered), [], 0
                    await feed(data)
        data, gathered = b"".join(gathered), []
        await feed(data)
        intake.end()
    except StrataError:
        if gathered:  # what arrived before the cut: its whole records are kept
            with contextlib.suppress(Invalid):
                await feed(b"".join(gathered))
        await settle()
        raise
    return await settle()

"""The file portal's pages (/portal): an end user signs in with the account the help desk
set up and reads their own files in their endpoint's snapshots. What they may see is
decided by services/portal.py on every request; these pages only show it."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from strata.errors import StrataError
from strata.server.console.render import render, secure
from strata.server.console.session import (
    LOGIN_COOKIE,
    check_csrf,
    new_login_token,
    set_cookie,
)
from strata.server.context import ServerContext
from strata.server.deps import client_ip, get_ctx
from strata.server.passwords import HashingBusy
from strata.server.services import portal
from strata.server.services.portal import PortalUser
from strata.server.services.signin import AddressThrottle, LoginRefused, TooManyAttempts

router = APIRouter(prefix="/portal", include_in_schema=False)
PORTAL_COOKIE = "strata_portal"


class PortalSignInNeeded(Exception):
    pass


@dataclass(frozen=True)
class PortalVisitor:
    user: PortalUser
    csrf: str


def _visitor(request: Request) -> PortalVisitor:
    secret = request.cookies.get(PORTAL_COOKIE, "")
    found = portal.session_user(request.app.state.ctx, secret) if secret else None
    if found is None:
        raise PortalSignInNeeded()
    return PortalVisitor(*found)


async def portal_visitor(request: Request) -> PortalVisitor:
    return await run_in_threadpool(_visitor, request)


def _page(request: Request, template: str, v: PortalVisitor | None, status: int = 200,
          **context: object) -> Response:
    return render(request, template, status, visitor=v, **context)


def _failed(request: Request, v: PortalVisitor, exc: StrataError) -> Response:
    return _page(request, "portal_message.html", v, exc.http_status, message=str(exc))


@router.get("/login")
def login_page(request: Request) -> Response:
    token = new_login_token()
    resp = _page(request, "portal_login.html", None, csrf=token, error="", name="")
    set_cookie(resp, request, LOGIN_COOKIE, token, max_age=3600)
    return resp


@router.post("/login")
def login(request: Request, name: str = Form("", max_length=64),
          password: str = Form("", max_length=1024), csrf: str = Form("", max_length=64),
          ctx: ServerContext = Depends(get_ctx)) -> Response:
    check_csrf(request, request.cookies.get(LOGIN_COOKIE, ""), csrf)
    throttle: AddressThrottle = request.app.state.login_throttle
    try:
        _user, secret, _csrf = portal.login(ctx, name, password, client_ip(request), throttle)
    except (LoginRefused, TooManyAttempts, HashingBusy) as exc:
        token = new_login_token()
        page = _page(request, "portal_login.html", None, exc.http_status, csrf=token,
                     error=str(exc), name=name)
        set_cookie(page, request, LOGIN_COOKIE, token, max_age=3600)
        return page
    resp = secure(RedirectResponse("/portal", status_code=303))
    set_cookie(resp, request, PORTAL_COOKIE, secret)
    resp.delete_cookie(LOGIN_COOKIE, path="/")
    return resp


@router.post("/logout")
def logout(request: Request, csrf: str = Form("", max_length=64),
           v: PortalVisitor = Depends(portal_visitor),
           ctx: ServerContext = Depends(get_ctx)) -> Response:
    check_csrf(request, v.csrf, csrf)
    portal.logout(ctx, request.cookies.get(PORTAL_COOKIE, ""))
    resp = secure(RedirectResponse("/portal/login", status_code=303))
    resp.delete_cookie(PORTAL_COOKIE, path="/")
    return resp


@router.get("")
def home(request: Request, v: PortalVisitor = Depends(portal_visitor),
         ctx: ServerContext = Depends(get_ctx)) -> Response:
    """The user's snapshots by date, newest first."""
    return _page(request, "portal_home.html", v, snapshots=portal.own_snapshots(ctx, v.user))


@router.get("/snapshots/{snapshot}")
def folder(snapshot: str, request: Request, path_hex: str = "", q: str = "",
           v: PortalVisitor = Depends(portal_visitor),
           ctx: ServerContext = Depends(get_ctx)) -> Response:
    try:
        listing = (portal.search(ctx, v.user, snapshot, q[:128]) if q.strip()
                   else portal.folder(ctx, v.user, snapshot, path_hex))
    except StrataError as exc:
        return _failed(request, v, exc)
    crumbs, acc = [], v.user.home
    for part in (listing.path.encode().split(b"/") if listing.path else []):
        acc = acc + b"/" + part
        crumbs.append((part.decode("utf-8", "replace"), acc.hex()))
    return _page(request, "portal_folder.html", v, listing=listing, crumbs=crumbs,
                 q=q[:128], searching=bool(q.strip()), limit=portal.SEARCH_RESULTS)


@router.get("/snapshots/{snapshot}/download")
def download(snapshot: str, request: Request, path_hex: str = "",
             v: PortalVisitor = Depends(portal_visitor),
             ctx: ServerContext = Depends(get_ctx)) -> Response:
    try:
        d = portal.download(ctx, v.user, snapshot, path_hex)
    except StrataError as exc:
        return _failed(request, v, exc)
    headers = {"Content-Disposition": d.disposition, "X-Content-Type-Options": "nosniff"}
    if d.size is not None:
        headers["Content-Length"] = str(d.size)
    return StreamingResponse(d.body, media_type=d.media_type, headers=headers)


def handle_sign_in(app: FastAPI) -> None:
    """A portal page asked for without a portal session goes to the portal's sign-in."""

    @app.exception_handler(PortalSignInNeeded)
    async def sign_in(_request: Request, _exc: PortalSignInNeeded) -> Response:
        return secure(RedirectResponse("/portal/login", status_code=303))

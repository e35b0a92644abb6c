"""The console: signing in and out, the dashboard, one's own account, and wiring every
page module into the app. Each page is a thin view over the same services the admin API
calls, behind the same permission as the matching API route; what a role may not use is
left out of its menu and refused (403) if asked for anyway."""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from strata.errors import StrataError
from strata.model.roles import Permission
from strata.server.console import admin_pages, fleet_pages, report_pages
from strata.server.console import portal as portal_pages
from strata.server.console.chart import storage_chart
from strata.server.console.render import STATIC, render, secure
from strata.server.console.session import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    CsrfRefused,
    Page,
    PageForbidden,
    SignInNeeded,
    Visitor,
    check_csrf,
    new_login_token,
    same_origin,
    set_cookie,
    visitor,
)
from strata.server.console.views import page, see_other
from strata.server.context import ServerContext
from strata.server.deps import client_ip, get_ctx
from strata.server.passwords import HashingBusy
from strata.server.services import (
    fleet,
    users,
)
from strata.server.services.signin import AddressThrottle, LoginRefused, TooManyAttempts

router = APIRouter(include_in_schema=False)
# Every router of console and portal pages, included with the API's once per process
# (server/app.py: shared_routes).
ROUTERS = [router, fleet_pages.router, admin_pages.router, report_pages.router,
           portal_pages.router]


# -- signing in and out ----------------------------------------------------------------------


@router.get("/login")
def login_page(request: Request, error: str = "") -> Response:
    try:
        visitor(request)
        return see_other("/")
    except SignInNeeded:
        pass
    token = new_login_token()
    resp = render(request, "login.html", csrf=token, error=error, name="")
    set_cookie(resp, request, LOGIN_COOKIE, token, max_age=3600)
    return resp


@router.post("/login")
def login(request: Request, name: str = Form("", max_length=64),
          password: str = Form("", max_length=1024), csrf: str = Form("", max_length=64),
          ctx: ServerContext = Depends(get_ctx)) -> Response:
    check_csrf(request, request.cookies.get(LOGIN_COOKIE, ""), csrf)
    throttle: AddressThrottle = request.app.state.login_throttle
    try:
        signed = users.login(ctx, name, password, client_ip(request), throttle)
    except (LoginRefused, TooManyAttempts, HashingBusy) as exc:
        token = new_login_token()
        page = render(request, "login.html", exc.http_status, csrf=token, error=str(exc),
                      name=name)
        set_cookie(page, request, LOGIN_COOKIE, token, max_age=3600)
        return page
    resp = see_other("/")
    # No max-age: the browser forgets it when closed; the server ends it earlier anyway.
    set_cookie(resp, request, SESSION_COOKIE, signed.session)
    resp.delete_cookie(LOGIN_COOKIE, path="/")
    return resp


@router.post("/logout")
def logout(request: Request, csrf: str = Form("", max_length=64),
           ctx: ServerContext = Depends(get_ctx)) -> Response:
    v = visitor(request)
    check_csrf(request, v.csrf, csrf)
    users.logout(ctx, request.cookies.get(SESSION_COOKIE, ""))
    resp = see_other("/login")
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


# -- pages -----------------------------------------------------------------------------------


@router.get("/")
def dashboard(request: Request, v: Visitor = Depends(Page(Permission.VIEW)),
              ctx: ServerContext = Depends(get_ctx)) -> Response:
    overview = fleet.overview(ctx)
    return page(request, "dashboard.html", v, fleet=overview,
                 chart=storage_chart(overview.history))


@router.get("/account")
def account_page(request: Request, v: Visitor = Depends(Page(Permission.VIEW))) -> Response:
    return page(request, "account.html", v, error="")


@router.post("/account/password")
def change_password(request: Request, current: str = Form("", max_length=1024),
                    new: str = Form("", max_length=1024), again: str = Form("", max_length=1024),
                    csrf: str = Form("", max_length=64),
                    v: Visitor = Depends(Page(Permission.VIEW)),
                    ctx: ServerContext = Depends(get_ctx)) -> Response:
    check_csrf(request, v.csrf, csrf)
    from pydantic import ValidationError

    from strata.model.users import PasswordRequest

    if new != again:
        return page(request, "account.html", v, 422, error="the two new passwords differ")
    try:
        PasswordRequest(password=new)
        users.change_own_password(ctx, v.staff.name, current, new)
    except ValidationError as exc:
        msg = exc.errors(include_url=False)[0]["msg"]
        return page(request, "account.html", v, 422, error=f"new password: {msg}")
    except StrataError as exc:
        return page(request, "account.html", v, exc.http_status, error=str(exc))
    resp = see_other("/login")  # every session of this user has ended: sign in again
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


# -- wiring ----------------------------------------------------------------------------------


def mount_console(app: FastAPI) -> None:
    """What the console's pages (ROUTERS, at `/` of the server itself) need of their app:
    the sign-in throttle, the assets under /static (all vendored: it works without
    internet) and the answers to a visitor who must sign in or may not see a page."""
    app.state.login_throttle = AddressThrottle()
    portal_pages.handle_sign_in(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(SignInNeeded)
    async def sign_in(request: Request, _exc: SignInNeeded) -> Response:
        if request.headers.get("HX-Request") == "true":  # htmx: send the whole page there
            return secure(Response(status_code=401, headers={"HX-Redirect": "/login"}))
        return see_other("/login")

    @app.exception_handler(PageForbidden)
    async def forbidden(request: Request, exc: PageForbidden) -> Response:
        v = exc.visitor
        return page(request, "message.html", v, 403, title="Not allowed",
                     message=f"Your role ({v.staff.role}) does not allow this page: it "
                             f"needs the '{exc.permission.value}' permission.")

    @app.exception_handler(CsrfRefused)
    async def csrf_refused(request: Request, _exc: CsrfRefused) -> Response:
        why = ("this form came from another site" if not same_origin(request)
               else "this form has expired or was not sent by this console")
        return render(request, "plain.html", 403, title="Refused",
                      message=f"Refused: {why}. Reload the page and try again.")

"""The console's pages: sign-in, dashboard, endpoints (search, detail), layers, policies,
users, audit log. Each page is a thin view over the same services the admin API calls,
behind the same permission as the matching API route; what a role may not use is left
out of its menu and refused (403) if asked for anyway."""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from strata.errors import StrataError
from strata.model.roles import ROLE_NAMES, Permission
from strata.model.units import human_bytes
from strata.model.users import UserRequest
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
from strata.server.context import ServerContext
from strata.server.deps import client_ip, get_ctx
from strata.server.maintenance import run_maintenance
from strata.server.services import audit, endpoints, fleet, layers, policies, users
from strata.server.services.users import AddressThrottle, LoginRefused, TooManyAttempts

router = APIRouter(include_in_schema=False)
# The menu: each entry shown only to the roles whose permission it needs.
NAV = [("/", "Dashboard", Permission.VIEW), ("/endpoints", "Endpoints", Permission.VIEW),
       ("/layers", "Layers", Permission.LAYERS), ("/policies", "Policies",
                                                   Permission.PROTECTION),
       ("/users", "Users", Permission.USERS), ("/audit", "Audit log", Permission.AUDIT)]
RETENTION_FIELDS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def _page(request: Request, template: str, v: Visitor, status: int = 200,
          **context: object) -> Response:
    nav = [(href, label) for href, label, perm in NAV if v.may(perm)]
    return render(request, template, status, visitor=v, nav=nav, **context)


def _see_other(url: str) -> Response:
    return secure(RedirectResponse(url, status_code=303))


# -- signing in and out ----------------------------------------------------------------------


@router.get("/login")
def login_page(request: Request, error: str = "") -> Response:
    try:
        visitor(request)
        return _see_other("/")
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
    except (LoginRefused, TooManyAttempts) as exc:
        token = new_login_token()
        page = render(request, "login.html", exc.http_status, csrf=token, error=str(exc),
                      name=name)
        set_cookie(page, request, LOGIN_COOKIE, token, max_age=3600)
        return page
    resp = _see_other("/")
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
    resp = _see_other("/login")
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


# -- pages -----------------------------------------------------------------------------------


@router.get("/")
def dashboard(request: Request, v: Visitor = Depends(Page(Permission.VIEW)),
              ctx: ServerContext = Depends(get_ctx)) -> Response:
    overview = fleet.overview(ctx)
    return _page(request, "dashboard.html", v, fleet=overview,
                 chart=storage_chart(overview.history))


@router.get("/endpoints")
def endpoint_list(request: Request, q: str = "", state: str = "", os: str = "", tag: str = "",
                  collection: str = "", v: Visitor = Depends(Page(Permission.VIEW)),
                  ctx: ServerContext = Depends(get_ctx)) -> Response:
    f = fleet.EndpointFilter(text=q[:128], state=state[:16], os=os[:64], tag=tag[:128],
                             collection=collection[:128])
    error = ""
    try:
        rows = fleet.search_endpoints(ctx, f)
    except StrataError as exc:  # an unknown collection
        rows, error = [], str(exc)
    if request.headers.get("HX-Request") == "true":  # the filters ask for rows only
        return render(request, "_endpoint_rows.html", rows=rows, error=error)
    return _page(request, "endpoints.html", v, rows=rows, f=f, error=error,
                 choices=fleet.filter_choices(ctx), limit=fleet.SEARCH_ROWS)


@router.get("/endpoints/{ref}")
def endpoint_page(ref: str, request: Request, v: Visitor = Depends(Page(Permission.VIEW)),
                  ctx: ServerContext = Depends(get_ctx)) -> Response:
    try:
        detail = endpoints.endpoint_detail(ctx, ref)
    except StrataError as exc:
        return _page(request, "message.html", v, exc.http_status, title="Endpoint",
                     message=str(exc))
    return _page(request, "endpoint.html", v, ep=detail)


@router.get("/layers")
def layer_list(request: Request, v: Visitor = Depends(Page(Permission.LAYERS)),
               ctx: ServerContext = Depends(get_ctx)) -> Response:
    return _page(request, "layers.html", v, layers=layers.list_layers(ctx))


def _policies_page(request: Request, v: Visitor, ctx: ServerContext, status: int = 200,
                   error: str = "", saved: bool = False, pruned: str = "") -> Response:
    return _page(request, "policies.html", v, status,
                 retention=policies.read_policy(ctx, "retention"),
                 upload=policies.read_policy(ctx, "upload"), fields=RETENTION_FIELDS,
                 error=error, saved=saved, pruned=pruned)


@router.get("/policies")
def policy_page(request: Request, v: Visitor = Depends(Page(Permission.PROTECTION)),
                ctx: ServerContext = Depends(get_ctx)) -> Response:
    return _policies_page(request, v, ctx)


@router.post("/policies/retention")
async def save_retention(request: Request, v: Visitor = Depends(Page(Permission.PROTECTION)),
                         ctx: ServerContext = Depends(get_ctx)) -> Response:
    form = await request.form(max_files=0, max_fields=16, max_part_size=1024)
    check_csrf(request, v.csrf, str(form.get("csrf", "")))
    doc: dict[str, int] = {}
    for key in RETENTION_FIELDS:
        text = str(form.get(key, "")).strip()
        if not text:
            continue
        if not text.lstrip("-").isdigit() or len(text) > 9:
            return _policies_page(request, v, ctx, 422,
                                  error=f"{key}: a whole number is needed (got {text!r})")
        doc[key] = int(text)
    try:
        policies.write_policy(ctx, "retention", dict(doc), actor=v.staff.actor)
    except StrataError as exc:
        return _policies_page(request, v, ctx, exc.http_status, error=str(exc))
    return _policies_page(request, v, ctx, saved=True)


@router.post("/maintenance")
def run_upkeep(request: Request, csrf: str = Form("", max_length=64),
               v: Visitor = Depends(Page(Permission.PRUNE)),
               ctx: ServerContext = Depends(get_ctx)) -> Response:
    check_csrf(request, v.csrf, csrf)
    done = run_maintenance(ctx, actor=v.staff.actor)
    prune = done.get("prune", {})
    if "error" in prune:
        note = f"retention applied; prune did not run: {prune['error']}"
    else:
        note = (f"{done['snapshots_removed']} snapshot(s) removed by retention; prune freed "
                f"{human_bytes(int(prune.get('plan', {}).get('bytes_freed', 0)))}")
    if not v.may(Permission.PROTECTION):  # an administrator always may; others land here
        return _page(request, "message.html", v, title="Maintenance", message=note)
    return _policies_page(request, v, ctx, pruned=note)


def _users_page(request: Request, v: Visitor, ctx: ServerContext, status: int = 200,
                error: str = "", done: str = "") -> Response:
    return _page(request, "users.html", v, status, users=users.list_users(ctx),
                 roles=ROLE_NAMES, error=error, done=done)


@router.get("/users")
def user_list(request: Request, v: Visitor = Depends(Page(Permission.USERS)),
              ctx: ServerContext = Depends(get_ctx)) -> Response:
    return _users_page(request, v, ctx)


@router.post("/users")
def user_create(request: Request, name: str = Form("", max_length=64),
                role: str = Form("", max_length=32),
                password: str = Form("", max_length=1024),
                csrf: str = Form("", max_length=64),
                v: Visitor = Depends(Page(Permission.USERS)),
                ctx: ServerContext = Depends(get_ctx)) -> Response:
    check_csrf(request, v.csrf, csrf)
    from pydantic import ValidationError

    try:
        req = UserRequest(name=name, role=role, password=password)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        return _users_page(request, v, ctx, 422,
                           error=f"{first['loc'][0]}: {first['msg']}")
    try:
        users.create_user(ctx, req, actor=v.staff.actor)
    except StrataError as exc:
        return _users_page(request, v, ctx, exc.http_status, error=str(exc))
    return _users_page(request, v, ctx, done=f"created user {name} ({role})")


@router.post("/users/{name}/delete")
def user_delete(name: str, request: Request, csrf: str = Form("", max_length=64),
                v: Visitor = Depends(Page(Permission.USERS)),
                ctx: ServerContext = Depends(get_ctx)) -> Response:
    check_csrf(request, v.csrf, csrf)
    try:
        users.delete_user(ctx, name, actor=v.staff.actor)
    except StrataError as exc:
        return _users_page(request, v, ctx, exc.http_status, error=str(exc))
    return _users_page(request, v, ctx, done=f"deleted user {name}")


def _user_page(request: Request, v: Visitor, ctx: ServerContext, name: str,
               status: int = 200, error: str = "", new_token: str = "") -> Response:
    try:
        tokens = users.list_tokens(ctx, name)
    except StrataError as exc:
        return _page(request, "message.html", v, exc.http_status, title="User",
                     message=str(exc))
    return _page(request, "user.html", v, status, name=name, tokens=tokens, error=error,
                 new_token=new_token)


@router.get("/users/{name}")
def user_page(name: str, request: Request, v: Visitor = Depends(Page(Permission.USERS)),
              ctx: ServerContext = Depends(get_ctx)) -> Response:
    return _user_page(request, v, ctx, name)


@router.post("/users/{name}/tokens")
def user_token_create(name: str, request: Request, label: str = Form("", max_length=128),
                      csrf: str = Form("", max_length=64),
                      v: Visitor = Depends(Page(Permission.USERS)),
                      ctx: ServerContext = Depends(get_ctx)) -> Response:
    check_csrf(request, v.csrf, csrf)
    try:
        made = users.create_token(ctx, name, label, actor=v.staff.actor)
    except StrataError as exc:
        return _user_page(request, v, ctx, name, exc.http_status, error=str(exc))
    return _user_page(request, v, ctx, name, new_token=made.token)


@router.post("/users/{name}/tokens/{token_id}/revoke")
def user_token_revoke(name: str, token_id: int, request: Request,
                      csrf: str = Form("", max_length=64),
                      v: Visitor = Depends(Page(Permission.USERS)),
                      ctx: ServerContext = Depends(get_ctx)) -> Response:
    check_csrf(request, v.csrf, csrf)
    try:
        users.revoke_token(ctx, name, token_id, actor=v.staff.actor)
    except StrataError as exc:
        return _user_page(request, v, ctx, name, exc.http_status, error=str(exc))
    return _user_page(request, v, ctx, name)


@router.get("/account")
def account_page(request: Request, v: Visitor = Depends(Page(Permission.VIEW))) -> Response:
    return _page(request, "account.html", v, error="")


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
        return _page(request, "account.html", v, 422, error="the two new passwords differ")
    try:
        PasswordRequest(password=new)
        users.change_own_password(ctx, v.staff.name, current, new)
    except ValidationError as exc:
        msg = exc.errors(include_url=False)[0]["msg"]
        return _page(request, "account.html", v, 422, error=f"new password: {msg}")
    except StrataError as exc:
        return _page(request, "account.html", v, exc.http_status, error=str(exc))
    resp = _see_other("/login")  # every session of this user has ended: sign in again
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


@router.get("/audit")
def audit_page(request: Request, v: Visitor = Depends(Page(Permission.AUDIT)),
               ctx: ServerContext = Depends(get_ctx)) -> Response:
    return _page(request, "audit.html", v, entries=audit.audit_log(ctx, 200))


# -- wiring ----------------------------------------------------------------------------------


def mount_console(app: FastAPI) -> None:
    """The console at `/` of the server itself, its assets under /static (all vendored:
    it works without internet)."""
    app.state.login_throttle = AddressThrottle()
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(SignInNeeded)
    async def sign_in(request: Request, _exc: SignInNeeded) -> Response:
        if request.headers.get("HX-Request") == "true":  # htmx: send the whole page there
            return secure(Response(status_code=401, headers={"HX-Redirect": "/login"}))
        return _see_other("/login")

    @app.exception_handler(PageForbidden)
    async def forbidden(request: Request, exc: PageForbidden) -> Response:
        v = exc.visitor
        return _page(request, "message.html", v, 403, title="Not allowed",
                     message=f"Your role ({v.staff.role}) does not allow this page: it "
                             f"needs the '{exc.permission.value}' permission.")

    @app.exception_handler(CsrfRefused)
    async def csrf_refused(request: Request, _exc: CsrfRefused) -> Response:
        why = ("this form came from another site" if not same_origin(request)
               else "this form has expired or was not sent by this console")
        return render(request, "plain.html", 403, title="Refused",
                      message=f"Refused: {why}. Reload the page and try again.")

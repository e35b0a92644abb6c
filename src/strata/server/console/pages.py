"""The console's pages: sign-in, dashboard, endpoints (search, detail), layers, policies,
users, audit log. Each page is a thin view over the same services the admin API calls,
behind the same permission as the matching API route; what a role may not use is left
out of its menu and refused (403) if asked for anyway."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from strata.errors import NotFound, StrataError
from strata.model.admin import CollectionRequest
from strata.model.roles import ROLE_NAMES, Permission
from strata.model.snapshot_files import SnapshotFileInfo
from strata.model.units import human_bytes
from strata.model.users import PortalAccountRequest, UserRequest
from strata.server.console.chart import storage_chart
from strata.server.console.portal import mount_portal
from strata.server.console.render import STATIC, csv_response, render, secure
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
from strata.server.services import (
    audit,
    collections,
    compliance,
    endpoints,
    fleet,
    layers,
    operations,
    policies,
    portal,
    snapshot_files,
    users,
)
from strata.server.services.facts import RULE_KEYS
from strata.server.services.lookup import find_endpoint
from strata.server.services.users import AddressThrottle, LoginRefused, TooManyAttempts

router = APIRouter(include_in_schema=False)
# The menu: each entry shown only to the roles whose permission it needs.
NAV = [("/", "Dashboard", Permission.VIEW), ("/endpoints", "Endpoints", Permission.VIEW),
       ("/tasks", "Tasks", Permission.VIEW), ("/compliance", "Compliance", Permission.VIEW),
       ("/layers", "Layers", Permission.LAYERS),
       ("/collections", "Collections", Permission.COLLECTIONS),
       ("/policies", "Policies", Permission.PROTECTION),
       ("/users", "Users", Permission.USERS), ("/audit", "Audit log", Permission.AUDIT)]
TASKS_SHOWN = 50
SNAPSHOT_ROWS = 500  # entries of a folder on one page
DIFF_ROWS = 500  # paths of each kind a layer diff page lists
AUDIT_ROWS = 200  # records the audit page shows
# Every key of the retention document, so that saving the form keeps nothing stale.
RETENTION_FIELDS = ("last", "hourly", "daily", "weekly", "monthly", "yearly",
                    "revert_points_days")
BANDWIDTH_FIELDS = ("subnet", "site", "start", "end", "upload_kbps", "download_kbps")
OS_NAMES = ("linux", "windows")


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
                  collection: str = "", format: str = "",
                  v: Visitor = Depends(Page(Permission.VIEW)),
                  ctx: ServerContext = Depends(get_ctx)) -> Response:
    f = fleet.EndpointFilter(text=q[:128], state=state[:16], os=os[:64], tag=tag[:128],
                             collection=collection[:128])
    error = ""
    try:
        rows = fleet.search_endpoints(ctx, f)
    except StrataError as exc:  # an unknown collection
        rows, error = [], str(exc)
    if format == "csv":
        return csv_response("endpoints", ["id", "hostname", "state", "os", "last_seen",
                                          "last_ip", "snapshots"],
                            [[e.id, e.hostname, e.state, e.os, e.last_seen, e.last_ip,
                              e.snapshots] for e in rows])
    if request.headers.get("HX-Request") == "true":  # the filters ask for rows only
        return render(request, "_endpoint_rows.html", rows=rows, error=error)
    return _page(request, "endpoints.html", v, rows=rows, f=f, error=error,
                 choices=fleet.filter_choices(ctx), limit=fleet.SEARCH_ROWS)


def _endpoint_page(request: Request, v: Visitor, ctx: ServerContext, ref: str,
                   status: int = 200, error: str = "", done: str = "") -> Response:
    try:
        detail = endpoints.endpoint_detail(ctx, ref)
    except StrataError as exc:
        return _page(request, "message.html", v, exc.http_status, title="Endpoint",
                     message=str(exc))
    accounts = portal.list_accounts(ctx, detail.id) if v.may(Permission.RESTORE) else []
    return _page(request, "endpoint.html", v, status, ep=detail, accounts=accounts,
                 error=error, done=done)


@router.get("/endpoints/{ref}")
def endpoint_page(ref: str, request: Request, v: Visitor = Depends(Page(Permission.VIEW)),
                  ctx: ServerContext = Depends(get_ctx)) -> Response:
    return _endpoint_page(request, v, ctx, ref)


@router.post("/endpoints/{ref}/portal-accounts")
def portal_account_create(ref: str, request: Request, name: str = Form("", max_length=64),
                          home: str = Form("", max_length=1024),
                          password: str = Form("", max_length=1024),
                          csrf: str = Form("", max_length=64),
                          v: Visitor = Depends(Page(Permission.RESTORE)),
                          ctx: ServerContext = Depends(get_ctx)) -> Response:
    """The help desk gives a user of this endpoint the file portal."""
    check_csrf(request, v.csrf, csrf)
    from pydantic import ValidationError

    try:
        req = PortalAccountRequest(name=name, home=home, password=password)
        made = portal.create_account(ctx, ref, req, actor=v.staff.actor)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        return _endpoint_page(request, v, ctx, ref, 422,
                              error=f"{first['loc'][0]}: {first['msg']}")
    except StrataError as exc:
        return _endpoint_page(request, v, ctx, ref, exc.http_status, error=str(exc))
    return _endpoint_page(request, v, ctx, ref,
                          done=f"portal account {made.name}: folder {made.home}")


@router.post("/endpoints/{ref}/portal-accounts/{name}/delete")
def portal_account_delete(ref: str, name: str, request: Request,
                          csrf: str = Form("", max_length=64),
                          v: Visitor = Depends(Page(Permission.RESTORE)),
                          ctx: ServerContext = Depends(get_ctx)) -> Response:
    check_csrf(request, v.csrf, csrf)
    try:
        if name not in {a.name for a in portal.list_accounts(ctx, ref)}:
            raise NotFound(f"this endpoint has no portal account {name!r}")
        portal.delete_account(ctx, name, actor=v.staff.actor)
    except StrataError as exc:
        return _endpoint_page(request, v, ctx, ref, exc.http_status, error=str(exc))
    return _endpoint_page(request, v, ctx, ref, done=f"deleted portal account {name}")


SNAPSHOT = "/endpoints/{ref}/snapshots/{snapshot}"


def _hex_path(path_hex: str) -> bytes:
    """The folder or file a browser link names: its bytes in hex, so that names that are
    not UTF-8 work like any other (checked by the snapshot service)."""
    return snapshot_files.parse_path(snapshot_files.path_from_hex("", path_hex[:8192]))


def _child(folder: bytes, entry: SnapshotFileInfo) -> str:
    name = bytes.fromhex(entry.raw_name) if entry.raw_name else entry.name.encode()
    return (folder + b"/" + name if folder else name).hex()


@router.get(SNAPSHOT + "/files")
def snapshot_page(ref: str, snapshot: str, request: Request, path_hex: str = "",
                  offset: int = 0, v: Visitor = Depends(Page(Permission.VIEW)),
                  ctx: ServerContext = Depends(get_ctx)) -> Response:
    """A folder of a snapshot, with download links for those who may restore files."""
    try:
        folder = _hex_path(path_hex)
        listing = snapshot_files.list_folder(ctx, ref, snapshot, folder, max(offset, 0),
                                             SNAPSHOT_ROWS)
        with ctx.session() as db:
            host = find_endpoint(db, listing.endpoint).hostname
    except StrataError as exc:
        return _page(request, "message.html", v, exc.http_status, title="Snapshot",
                     message=str(exc))
    crumbs, acc = [], b""
    for part in folder.split(b"/") if folder else []:
        acc = acc + b"/" + part if acc else part
        crumbs.append((part.decode("utf-8", "replace"), acc.hex()))
    rows = [(e, _child(folder, e)) for e in listing.entries]
    return _page(request, "snapshot.html", v, listing=listing, host=host, crumbs=crumbs,
                 rows=rows, here=folder.hex(), may_restore=v.may(Permission.RESTORE))


@router.get(SNAPSHOT + "/download")
def snapshot_download(ref: str, snapshot: str, request: Request, path_hex: str = "",
                      format: str | None = None,
                      v: Visitor = Depends(Page(Permission.RESTORE)),
                      ctx: ServerContext = Depends(get_ctx)) -> Response:
    """A file, or a folder as tar or zip: restoring files for a user (audited)."""
    try:
        d = snapshot_files.download(ctx, ref, snapshot, _hex_path(path_hex), format,
                                    v.staff.actor)
    except StrataError as exc:
        return _page(request, "message.html", v, exc.http_status, title="Download",
                     message=str(exc))
    headers = {"Content-Disposition": d.disposition, "X-Content-Type-Options": "nosniff"}
    if d.size is not None:
        headers["Content-Length"] = str(d.size)
    return StreamingResponse(d.body, media_type=d.media_type, headers=headers)


@router.get("/tasks")
def task_list(request: Request, v: Visitor = Depends(Page(Permission.VIEW)),
              ctx: ServerContext = Depends(get_ctx)) -> Response:
    return _page(request, "tasks.html", v, tasks=operations.recent_tasks(ctx, TASKS_SHOWN))


@router.get("/tasks/{tid}")
def task_page(tid: int, request: Request, v: Visitor = Depends(Page(Permission.VIEW)),
              ctx: ServerContext = Depends(get_ctx)) -> Response:
    try:
        task = operations.task_info(ctx, tid)
    except StrataError as exc:
        return _page(request, "message.html", v, exc.http_status, title="Task",
                     message=str(exc))
    if request.headers.get("HX-Request") == "true":  # the progress polls itself
        return render(request, "_task_progress.html", task=task)
    return _page(request, "task.html", v, task=task)


@router.get("/compliance")
def compliance_page(request: Request, v: Visitor = Depends(Page(Permission.VIEW)),
                    ctx: ServerContext = Depends(get_ctx)) -> Response:
    return _page(request, "compliance.html", v, report=compliance.compliance_report(ctx))


@router.get("/layers")
def layer_list(request: Request, v: Visitor = Depends(Page(Permission.LAYERS)),
               ctx: ServerContext = Depends(get_ctx), done: str = "") -> Response:
    return _page(request, "layers.html", v, layers=layers.list_layers(ctx), done=done[:200])


def _layer_page(request: Request, v: Visitor, ctx: ServerContext, ref: str,
                status: int = 200, error: str = "") -> Response:
    try:
        layer = layers.show_layer(ctx, ref)
    except StrataError as exc:
        return _page(request, "message.html", v, exc.http_status, title="Layer",
                     message=str(exc))
    versions = [lay for lay in layers.list_layers(ctx)
                if lay.name == layer.name and lay.id != layer.id]
    return _page(request, "layer.html", v, status, layer=layer, versions=versions,
                 error=error)


@router.get("/layers/{ref}")
def layer_page(ref: str, request: Request, v: Visitor = Depends(Page(Permission.LAYERS)),
               ctx: ServerContext = Depends(get_ctx)) -> Response:
    return _layer_page(request, v, ctx, ref)


@router.get("/layers/{a}/diff/{b}")
def layer_diff_page(a: str, b: str, request: Request,
                    v: Visitor = Depends(Page(Permission.LAYERS)),
                    ctx: ServerContext = Depends(get_ctx)) -> Response:
    try:
        diff = layers.diff_layers(ctx, a, b)
    except StrataError as exc:
        return _page(request, "message.html", v, exc.http_status, title="Layer diff",
                     message=str(exc))
    return _page(request, "layer_diff.html", v, diff=diff, shown=DIFF_ROWS)


@router.post("/layers/{ref}/delete")
def layer_delete(ref: str, request: Request, csrf: str = Form("", max_length=64),
                 v: Visitor = Depends(Page(Permission.LAYERS)),
                 ctx: ServerContext = Depends(get_ctx)) -> Response:
    check_csrf(request, v.csrf, csrf)
    try:
        gone = layers.delete_layer(ctx, ref, actor=v.staff.actor)
    except StrataError as exc:
        return _layer_page(request, v, ctx, ref, exc.http_status, error=str(exc))
    return _see_other(f"/layers?done={quote('deleted layer ' + gone.deleted)}")


def _collections_page(request: Request, v: Visitor, ctx: ServerContext, status: int = 200,
                      error: str = "", done: str = "") -> Response:
    return _page(request, "collections.html", v, status,
                 collections=collections.list_collections(ctx), rule_keys=RULE_KEYS,
                 error=error, done=done)


@router.get("/collections")
def collection_list(request: Request, v: Visitor = Depends(Page(Permission.COLLECTIONS)),
                    ctx: ServerContext = Depends(get_ctx)) -> Response:
    return _collections_page(request, v, ctx)


@router.post("/collections")
async def collection_save(request: Request,
                          v: Visitor = Depends(Page(Permission.COLLECTIONS)),
                          ctx: ServerContext = Depends(get_ctx)) -> Response:
    form = await request.form(max_files=0, max_fields=16, max_part_size=64 << 10)
    check_csrf(request, v.csrf, str(form.get("csrf", "")))
    from pydantic import ValidationError

    rule = {k: str(form.get(k, "")).strip() for k in RULE_KEYS if str(form.get(k, "")).strip()}
    members = [m for m in str(form.get("members", "")).replace(",", " ").split() if m]
    try:
        req = CollectionRequest(name=str(form.get("name", "")).strip(), rule=rule,
                                members=members)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        return await run_in_threadpool(_collections_page, request, v, ctx, 422,
                                       f"{first['loc'][0]}: {first['msg']}")
    try:
        info = await run_in_threadpool(collections.save_collection, ctx, req,
                                       actor=v.staff.actor)
    except StrataError as exc:
        return await run_in_threadpool(_collections_page, request, v, ctx, exc.http_status,
                                       str(exc))
    return await run_in_threadpool(_collections_page, request, v, ctx, 200, "",
                                   f"saved collection {info.name}: "
                                   f"{len(info.endpoints)} endpoint(s) now")


@router.post("/collections/{name}/delete")
def collection_delete(name: str, request: Request, csrf: str = Form("", max_length=64),
                      v: Visitor = Depends(Page(Permission.COLLECTIONS)),
                      ctx: ServerContext = Depends(get_ctx)) -> Response:
    check_csrf(request, v.csrf, csrf)
    try:
        collections.delete_collection(ctx, name, actor=v.staff.actor)
    except StrataError as exc:
        return _collections_page(request, v, ctx, exc.http_status, error=str(exc))
    return _collections_page(request, v, ctx, done=f"deleted collection {name}")


def _policies_page(request: Request, v: Visitor, ctx: ServerContext, status: int = 200,
                   error: str = "", saved: str = "", pruned: str = "") -> Response:
    upload = policies.read_policy(ctx, "upload")
    exclusions = upload.get("exclusions")
    by_os = exclusions if isinstance(exclusions, dict) else {}
    return _page(request, "policies.html", v, status,
                 retention=policies.read_policy(ctx, "retention"), upload=upload,
                 exclusions={o: "\n".join(str(p) for p in by_os.get(o) or [])  # type: ignore[union-attr]
                             for o in OS_NAMES},
                 bandwidth=_bandwidth_rules(ctx),
                 fields=RETENTION_FIELDS, bandwidth_fields=BANDWIDTH_FIELDS,
                 error=error, saved=saved, pruned=pruned)


def _bandwidth_rules(ctx: ServerContext) -> list[dict[str, Any]]:
    rules = policies.read_policy(ctx, "bandwidth").get("rules")
    return [r for r in rules if isinstance(r, dict)] if isinstance(rules, list) else []


def _save_policy(request: Request, v: Visitor, ctx: ServerContext, kind: str,
                 doc: dict[str, Any]) -> Response:
    try:
        policies.write_policy(ctx, kind, doc, actor=v.staff.actor)
    except StrataError as exc:
        return _policies_page(request, v, ctx, exc.http_status, error=str(exc))
    return _policies_page(request, v, ctx, saved=f"{kind.capitalize()} policy saved.")


async def _form(request: Request, v: Visitor) -> dict[str, str]:
    form = await request.form(max_files=0, max_fields=32, max_part_size=256 << 10)
    check_csrf(request, v.csrf, str(form.get("csrf", "")))
    return {k: str(val) for k, val in form.items()}


@router.post("/policies/upload")
async def save_upload(request: Request, v: Visitor = Depends(Page(Permission.PROTECTION)),
                      ctx: ServerContext = Depends(get_ctx)) -> Response:
    form = await _form(request, v)
    text = form.get("interval_seconds", "").strip()
    if not text.isdigit() or len(text) > 9:
        return await run_in_threadpool(_policies_page, request, v, ctx, 422,
                                       f"interval: a whole number of seconds is needed "
                                       f"(got {text!r})")
    doc = {"interval_seconds": int(text), "exclusions": {
        o: [line.strip() for line in form.get(f"exclude_{o}", "").splitlines()
            if line.strip()] for o in OS_NAMES}}
    return await run_in_threadpool(_save_policy, request, v, ctx, "upload", doc)


@router.post("/policies/bandwidth")
async def save_bandwidth(request: Request,
                         v: Visitor = Depends(Page(Permission.PROTECTION)),
                         ctx: ServerContext = Depends(get_ctx)) -> Response:
    """Adds a rule (the fields given) or, with `remove=N`, removes rule N (from 1)."""
    form = await _form(request, v)
    rules = await run_in_threadpool(_bandwidth_rules, ctx)
    remove = form.get("remove", "")
    if remove:
        if not remove.isdigit() or not 1 <= int(remove) <= len(rules):
            return await run_in_threadpool(_policies_page, request, v, ctx, 422,
                                           f"no bandwidth rule {remove!r}")
        del rules[int(remove) - 1]
    else:
        rule: dict[str, Any] = {}
        for key in BANDWIDTH_FIELDS:
            value = form.get(key, "").strip()
            if not value:
                continue
            if key.endswith("_kbps"):
                if not value.isdigit() or len(value) > 9:
                    return await run_in_threadpool(
                        _policies_page, request, v, ctx, 422,
                        f"{key}: a whole number of kbit/s is needed (got {value!r})")
                rule[key] = int(value)
            else:
                rule[key] = value
        if not rule:
            return await run_in_threadpool(_policies_page, request, v, ctx, 422,
                                           "a bandwidth rule needs at least one field")
        rules.append(rule)
    return await run_in_threadpool(_save_policy, request, v, ctx, "bandwidth",
                                   {"rules": rules})


@router.get("/policies")
def policy_page(request: Request, v: Visitor = Depends(Page(Permission.PROTECTION)),
                ctx: ServerContext = Depends(get_ctx)) -> Response:
    return _policies_page(request, v, ctx)


@router.post("/policies/retention")
async def save_retention(request: Request, v: Visitor = Depends(Page(Permission.PROTECTION)),
                         ctx: ServerContext = Depends(get_ctx)) -> Response:
    form = await _form(request, v)
    doc: dict[str, Any] = {}
    for key in RETENTION_FIELDS:
        text = form.get(key, "").strip()
        if not text:
            continue
        if not text.lstrip("-").isdigit() or len(text) > 9:
            return await run_in_threadpool(
                _policies_page, request, v, ctx, 422,
                f"{key}: a whole number is needed (got {text!r})")
        doc[key] = int(text)
    return await run_in_threadpool(_save_policy, request, v, ctx, "retention", doc)


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
def audit_page(request: Request, who: str = "", format: str = "",
               v: Visitor = Depends(Page(Permission.AUDIT)),
               ctx: ServerContext = Depends(get_ctx)) -> Response:
    """The latest records; `who` keeps those whose actor contains it (e.g. user:hana)."""
    who = who[:64]
    entries = [e for e in audit.audit_log(ctx, audit.MAX_ROWS) if who in e.actor][:AUDIT_ROWS]
    if format == "csv":
        return csv_response("audit", ["time", "actor", "action", "target", "detail"],
                            [[e.time, e.actor, e.action, e.target,
                              json.dumps(e.detail, ensure_ascii=False)] for e in entries])
    return _page(request, "audit.html", v, entries=entries, who=who)


# -- wiring ----------------------------------------------------------------------------------


def mount_console(app: FastAPI) -> None:
    """The console at `/` of the server itself, its assets under /static (all vendored:
    it works without internet)."""
    app.state.login_throttle = AddressThrottle()
    app.include_router(router)
    mount_portal(app)
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

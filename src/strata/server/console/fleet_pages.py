"""Console pages about the fleet: endpoints (search, filters, detail, file portal
accounts), their snapshots (browse, download), tasks and compliance."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response, StreamingResponse

from strata.errors import NotFound, StrataError
from strata.model.roles import Permission
from strata.model.snapshot_files import SnapshotFileInfo
from strata.model.users import PortalAccountRequest
from strata.server.console.render import csv_response, render
from strata.server.console.session import (
    Page,
    Visitor,
    check_csrf,
)
from strata.server.console.views import page, see_other
from strata.server.context import ServerContext
from strata.server.deps import get_ctx
from strata.server.services import (
    compliance,
    endpoints,
    fleet,
    portal,
    snapshot_files,
    software,
    tasks,
)
from strata.server.services.lookup import find_endpoint

router = APIRouter(include_in_schema=False)
TASKS_SHOWN = 50
TASK_ROWS = 200
TASK_ROW_ORDER = {"failed": 0, "applying": 1, "ready": 2, "downloading": 3, "assigned": 4,
                  "cancelled": 5, "superseded": 6, "applied": 7}
SNAPSHOT_ROWS = 500  # entries of a folder on one page
COMPLIANCE_SECONDS = 60.0


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
    return page(request, "endpoints.html", v, rows=rows, f=f, error=error,
                 choices=fleet.filter_choices(ctx), limit=fleet.SEARCH_ROWS)


def _endpoint_page(request: Request, v: Visitor, ctx: ServerContext, ref: str,
                   status: int = 200, error: str = "", done: str = "") -> Response:
    try:
        detail = endpoints.endpoint_detail(ctx, ref)
    except StrataError as exc:
        return page(request, "message.html", v, exc.http_status, title="Endpoint",
                     message=str(exc))
    accounts = portal.list_accounts(ctx, detail.id) if v.may(Permission.RESTORE) else []
    return page(request, "endpoint.html", v, status, ep=detail, accounts=accounts,
                 error=error, done=done, software=software.list_of(ctx, detail.id))


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
        return page(request, "message.html", v, exc.http_status, title="Snapshot",
                     message=str(exc))
    crumbs, acc = [], b""
    for part in folder.split(b"/") if folder else []:
        acc = acc + b"/" + part if acc else part
        crumbs.append((part.decode("utf-8", "replace"), acc.hex()))
    rows = [(e, _child(folder, e)) for e in listing.entries]
    return page(request, "snapshot.html", v, listing=listing, host=host, crumbs=crumbs,
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
        return page(request, "message.html", v, exc.http_status, title="Download",
                     message=str(exc))
    headers = {"Content-Disposition": d.disposition, "X-Content-Type-Options": "nosniff"}
    if d.size is not None:
        headers["Content-Length"] = str(d.size)
    return StreamingResponse(d.body, media_type=d.media_type, headers=headers)


def _may_change(v: Visitor) -> set[str]:
    """The kinds of task whose cancel and retry buttons this user sees."""
    return {kind for kind, perm in tasks.TASK_PERMISSION.items() if v.may(perm)}


@router.get("/tasks")
def task_list(request: Request, format: str = "",
              v: Visitor = Depends(Page(Permission.VIEW)),
              ctx: ServerContext = Depends(get_ctx)) -> Response:
    rows = tasks.recent_tasks(ctx, TASKS_SHOWN)
    if format == "csv":
        return csv_response("tasks", ["id", "kind", "created_at", "endpoints", "state",
                                      "progress", *tasks.CSV_STATES],
                            [[t.id, t.kind, t.created_at, t.size, t.state, t.progress,
                              *(t.counts.get(s, 0) for s in tasks.CSV_STATES)] for t in rows])
    return page(request, "tasks.html", v, tasks=rows, may_change=_may_change(v))


def _task_page(request: Request, v: Visitor, ctx: ServerContext, tid: int,
               status: int = 200, error: str = "", done: str = "") -> Response:
    try:
        task = tasks.task_info(ctx, tid)
    except StrataError as exc:
        return page(request, "message.html", v, exc.http_status, title="Task",
                     message=str(exc))
    # A task over the whole fleet: the endpoints that need a look first (failed, then
    # those under way), at most TASK_ROWS of them; the CSV has every one.
    rows = sorted(task.endpoints, key=lambda e: TASK_ROW_ORDER.get(e.state, 9))[:TASK_ROWS]
    if request.headers.get("HX-Request") == "true":  # the progress polls itself
        return render(request, "_task_progress.html", task=task, rows=rows)
    return page(request, "task.html", v, status, task=task, rows=rows,
                 may_change=_may_change(v), error=error, done=done)


# What the page says after a cancel or retry (the redirect names one, with a count).
DONE = {"cancel": "cancelled: {n} endpoint(s) not started are skipped; those under way finish",
        "retry": "queued again: {n} endpoint(s)"}


@router.get("/tasks/{tid}")
def task_page(tid: int, request: Request, format: str = "", done: str = "", n: int = 0,
              v: Visitor = Depends(Page(Permission.VIEW)),
              ctx: ServerContext = Depends(get_ctx)) -> Response:
    if format == "csv":
        try:
            task = tasks.task_info(ctx, tid)
        except StrataError as exc:
            return page(request, "message.html", v, exc.http_status, title="Task",
                         message=str(exc))
        return csv_response(f"task-{tid}", ["endpoint", "hostname", "state", "percent",
                                             "attempts", "detail"],
                            [[e.endpoint, e.hostname, e.state, e.percent, e.attempts,
                              e.detail] for e in task.endpoints])
    said = DONE[done].format(n=max(n, 0)) if done in DONE else ""
    return _task_page(request, v, ctx, tid, done=said)


@router.post("/tasks/{tid}/cancel")
def task_cancel(tid: int, request: Request, csrf: str = Form("", max_length=64),
                v: Visitor = Depends(Page(Permission.VIEW)),
                ctx: ServerContext = Depends(get_ctx)) -> Response:
    """Skip the endpoints that have not started (the kind's permission is checked by the
    service: an image manager's migration is not the help desk's to cancel)."""
    check_csrf(request, v.csrf, csrf)
    try:
        task = tasks.cancel(ctx, tid, v.staff)
    except StrataError as exc:
        return _task_page(request, v, ctx, tid, exc.http_status, error=str(exc))
    # Post, redirect, get: a reload of the page does not send the form again.
    return see_other(f"/tasks/{tid}?done=cancel&n={task.counts.get('cancelled', 0)}")


@router.post("/tasks/{tid}/retry")
def task_retry(tid: int, request: Request, csrf: str = Form("", max_length=64),
               v: Visitor = Depends(Page(Permission.VIEW)),
               ctx: ServerContext = Depends(get_ctx)) -> Response:
    check_csrf(request, v.csrf, csrf)
    try:
        task = tasks.retry(ctx, tid, v.staff)
    except StrataError as exc:
        return _task_page(request, v, ctx, tid, exc.http_status, error=str(exc))
    return see_other(f"/tasks/{tid}?done=retry&n={task.counts.get('assigned', 0)}")


@router.get("/compliance")
def compliance_page(request: Request, v: Visitor = Depends(Page(Permission.VIEW)),
                    ctx: ServerContext = Depends(get_ctx)) -> Response:
    # Measuring drift reads every endpoint's latest snapshot against its layers: kept for
    # a minute (COMPLIANCE_SECONDS), as the API's report is not.
    report = ctx.cached("console:compliance", lambda: compliance.compliance_report(ctx),
                        ttl=COMPLIANCE_SECONDS)
    return page(request, "compliance.html", v, report=report)

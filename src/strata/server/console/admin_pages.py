"""Console pages of IT's own work: layers (detail, diff, delete), collections, policies
and upkeep, users and their API tokens, the audit log."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from strata.errors import Conflict, StrataError
from strata.model.admin import CollectionRequest, policy_revision
from strata.model.roles import ROLE_NAMES, Permission
from strata.model.units import human_bytes
from strata.model.users import UserRequest
from strata.server.console.render import csv_response
from strata.server.console.session import (
    Page,
    Visitor,
    check_csrf,
)
from strata.server.console.views import page, see_other
from strata.server.context import ServerContext
from strata.server.deps import get_ctx
from strata.server.maintenance import run_maintenance
from strata.server.services import (
    audit,
    collections,
    layers,
    policies,
    users,
)
from strata.server.services.facts import RULE_KEYS

router = APIRouter(include_in_schema=False)
DIFF_ROWS = 500  # paths of each kind a layer diff page lists
AUDIT_ROWS = 200  # records the audit page shows
# Every key of the retention document, so that saving the form keeps nothing stale.
RETENTION_FIELDS = ("last", "hourly", "daily", "weekly", "monthly", "yearly",
                    "protect_days")
BANDWIDTH_FIELDS = ("subnet", "site", "start", "end", "upload_kbps", "download_kbps")
OS_NAMES = ("linux", "windows")


@router.get("/layers")
def layer_list(request: Request, v: Visitor = Depends(Page(Permission.LAYERS)),
               ctx: ServerContext = Depends(get_ctx), done: str = "") -> Response:
    return page(request, "layers.html", v, layers=layers.list_layers(ctx), done=done[:200])


def _layer_page(request: Request, v: Visitor, ctx: ServerContext, ref: str,
                status: int = 200, error: str = "") -> Response:
    try:
        layer = layers.show_layer(ctx, ref)
    except StrataError as exc:
        return page(request, "message.html", v, exc.http_status, title="Layer",
                     message=str(exc))
    versions = [lay for lay in layers.list_layers(ctx)
                if lay.name == layer.name and lay.id != layer.id]
    return page(request, "layer.html", v, status, layer=layer, versions=versions,
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
        return page(request, "message.html", v, exc.http_status, title="Layer diff",
                     message=str(exc))
    return page(request, "layer_diff.html", v, diff=diff, shown=DIFF_ROWS)


@router.post("/layers/{ref}/delete")
def layer_delete(ref: str, request: Request, csrf: str = Form("", max_length=64),
                 v: Visitor = Depends(Page(Permission.LAYERS)),
                 ctx: ServerContext = Depends(get_ctx)) -> Response:
    check_csrf(request, v.csrf, csrf)
    try:
        gone = layers.delete_layer(ctx, ref, actor=v.staff.actor)
    except StrataError as exc:
        return _layer_page(request, v, ctx, ref, exc.http_status, error=str(exc))
    return see_other(f"/layers?done={quote('deleted layer ' + gone.deleted)}")


def _collections_page(request: Request, v: Visitor, ctx: ServerContext, status: int = 200,
                      error: str = "", done: str = "") -> Response:
    return page(request, "collections.html", v, status,
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
    retention, bandwidth = (policies.read_policy(ctx, k) for k in ("retention", "bandwidth"))
    # Each form sends back the revision it shows: a save over another admin's change
    # since is refused (policy set's check, services/policies.py).
    revisions = {"retention": policy_revision(retention), "upload": policy_revision(upload),
                 "bandwidth": policy_revision(bandwidth)}
    return page(request, "policies.html", v, status, revisions=revisions,
                 retention=retention, upload=upload,
                 exclusions={o: "\n".join(str(p) for p in by_os.get(o) or [])  # type: ignore[union-attr]
                             for o in OS_NAMES},
                 bandwidth=_bandwidth_rules(ctx),
                 fields=RETENTION_FIELDS, bandwidth_fields=BANDWIDTH_FIELDS,
                 error=error, saved=saved, pruned=pruned)


def _bandwidth_rules(ctx: ServerContext) -> list[dict[str, Any]]:
    rules = policies.read_policy(ctx, "bandwidth").get("rules")
    return [r for r in rules if isinstance(r, dict)] if isinstance(rules, list) else []


def _save_policy(request: Request, v: Visitor, ctx: ServerContext, kind: str,
                 doc: dict[str, Any], revision: str = "") -> Response:
    try:
        policies.write_policy(ctx, kind, doc, actor=v.staff.actor,
                              expected=revision[:64] or None)
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
    return await run_in_threadpool(_save_policy, request, v, ctx, "upload", doc,
                                   form.get("revision", ""))


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
                                   {"rules": rules}, form.get("revision", ""))


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
    return await run_in_threadpool(_save_policy, request, v, ctx, "retention", doc,
                                   form.get("revision", ""))


@router.post("/maintenance")
def run_upkeep(request: Request, csrf: str = Form("", max_length=64),
               v: Visitor = Depends(Page(Permission.PRUNE)),
               ctx: ServerContext = Depends(get_ctx)) -> Response:
    check_csrf(request, v.csrf, csrf)
    try:
        done = run_maintenance(ctx, actor=v.staff.actor)
    except Conflict as exc:  # another server process is running it
        done = {"busy": str(exc)}
    prune = done.get("prune", {})
    if "busy" in done:
        note = f"maintenance did not run: {done['busy']}"
    elif "error" in prune:
        note = f"retention applied; prune did not run: {prune['error']}"
    else:
        note = (f"{done['snapshots_removed']} snapshot(s) removed by retention; prune freed "
                f"{human_bytes(int(prune.get('plan', {}).get('bytes_freed', 0)))}")
    if not v.may(Permission.PROTECTION):  # an administrator always may; others land here
        return page(request, "message.html", v, title="Maintenance", message=note)
    return _policies_page(request, v, ctx, pruned=note)


def _users_page(request: Request, v: Visitor, ctx: ServerContext, status: int = 200,
                error: str = "", done: str = "") -> Response:
    return page(request, "users.html", v, status, users=users.list_users(ctx),
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


@router.post("/users/{name}/role")
def user_role(name: str, request: Request, role: str = Form("", max_length=32),
              csrf: str = Form("", max_length=64),
              v: Visitor = Depends(Page(Permission.USERS)),
              ctx: ServerContext = Depends(get_ctx)) -> Response:
    check_csrf(request, v.csrf, csrf)
    if role not in ROLE_NAMES:
        return _users_page(request, v, ctx, 422, error=f"no role {role!r}")
    try:
        users.set_role(ctx, name, role, actor=v.staff.actor)
    except StrataError as exc:
        return _users_page(request, v, ctx, exc.http_status, error=str(exc))
    return _users_page(request, v, ctx, done=f"{name} is now {role}")


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
        return page(request, "message.html", v, exc.http_status, title="User",
                     message=str(exc))
    return page(request, "user.html", v, status, name=name, tokens=tokens, error=error,
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


@router.get("/audit")
def audit_page(request: Request, who: str = "", format: str = "",
               v: Visitor = Depends(Page(Permission.AUDIT)),
               ctx: ServerContext = Depends(get_ctx)) -> Response:
    """The latest records; `who` keeps those whose actor contains it (e.g. user:hana)."""
    who = who[:64]
    entries = audit.audit_log(ctx, AUDIT_ROWS, actor_contains=who)
    if format == "csv":
        return csv_response("audit", ["time", "actor", "action", "target", "detail"],
                            [[e.time, e.actor, e.action, e.target,
                              json.dumps(e.detail, ensure_ascii=False)] for e in entries])
    return page(request, "audit.html", v, entries=entries, who=who)

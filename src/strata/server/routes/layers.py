"""The admin API for layers: capture (from an uploaded tree or a centralized endpoint),
list/show/diff/delete, collections, assignment, dry-run, compliance, revert, restore to
new hardware, provisioning and migration tasks. Every change is audited."""

from __future__ import annotations

import os
import re
import time

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from strata.engine.diff import diff_entries
from strata.errors import CorruptData, MissingChunks
from strata.layers.capture import app_difference, without_layers
from strata.layers.compliance import check_compliance
from strata.layers.config_merge import StoreInputs, resolve_merges
from strata.layers.image import build_image
from strata.layers.plan import plan_update
from strata.model.entry import EntryType
from strata.model.ids import content_id
from strata.model.manifest import decode_manifest
from strata.model.names import (
    COLLECTION_NAME,
    LAYER_KINDS,
    LAYER_NAME,
    LAYER_VERSION,
    OS_FAMILIES,
)
from strata.model.wire import MissingRequest, MissingResponse, UploadResponse
from strata.server.catalog.models import (
    Assignment,
    Collection,
    Cvd,
    Endpoint,
    Layer,
    SnapshotRecord,
    Task,
)
from strata.server.context import ServerContext
from strata.server.deps import audit, get_ctx, require_admin, signing_required
from strata.server.layers import (
    assigned_layers,
    endpoint_family,
    find_layer,
    image_of,
    latest_snapshot,
    layer_content,
    rules_for,
    save_layer,
    set_state,
    snapshot_entries,
)
from strata.server.routes.admin import _find_endpoint
from strata.server.routes.agent import _ids, _read_body, _store_bundle
from strata.tree.scan import display

router = APIRouter(prefix="/api/v1/admin", tags=["layers"], dependencies=[Depends(require_admin)])


def _layer(db: Session, ref: str, kind: str | None = None) -> Layer:
    """The layer an admin named: NAME:VERSION or a numeric id, nothing looser (a bare
    NAME would silently pick the newest version, and a delete or an assignment must
    not guess)."""
    name, sep, version = ref.partition(":")
    if not (ref.isascii() and ref.isdigit()) and not (sep and re.fullmatch(LAYER_NAME, name)
                                  and re.fullmatch(LAYER_VERSION, version)):
        raise HTTPException(422, f"malformed layer reference {ref!r}: expected "
                                 "NAME:VERSION, e.g. corp-os:2")
    row = find_layer(db, ref)
    if kind and row.kind != kind:
        article = "an" if row.kind[0] in "aeiou" else "a"
        raise HTTPException(422, f"layer {ref!r} is {article} {row.kind} layer, not {kind}")
    return row


def layer_doc(row: Layer) -> dict:
    return {"id": row.id, "kind": row.kind, "name": row.name, "version": row.version,
            "ref": f"{row.name}:{row.version}", "snapshot": row.snapshot, "os": row.os,
            "match": row.match, "removes": len(row.removes), "files": row.files,
            "bytes": row.bytes, "source": row.source, "created_at": row.created_at}


# -- capture ------------------------------------------------------------------------------

@router.post("/chunks/missing", response_model=MissingResponse)
def admin_missing(body: MissingRequest, ctx: ServerContext = Depends(get_ctx)) -> MissingResponse:
    """Which chunks of a tree the admin is capturing the server lacks."""
    ids = _ids(body.ids)
    ctx.touch_upload("admin")
    return MissingResponse(missing=[c.hex() for c in ctx.store.missing_chunks(ids)])


@router.post("/chunks", response_model=UploadResponse,
             openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}}})
async def admin_upload(request: Request,
                       ctx: ServerContext = Depends(get_ctx)) -> UploadResponse:
    data = await _read_body(request, ctx.settings.max_upload_bytes)
    ctx.touch_upload("admin")
    return await run_in_threadpool(_store_bundle, ctx, data)


class LayerCommit(BaseModel):
    kind: str
    name: str = Field(min_length=1, max_length=128, pattern=LAYER_NAME)
    version: str = Field(min_length=1, max_length=64, pattern=LAYER_VERSION)
    os: str = "linux"
    match: dict[str, str] = Field(default_factory=dict)
    source: str = Field(default="", max_length=255)
    # An uploaded tree: the manifest (chunks already uploaded) ...
    manifest: list[tuple[str, int]] = Field(default_factory=list)
    manifest_id: str = ""
    # ... for an app layer, already the difference, with what the install removed.
    removes: list[str] = Field(default_factory=list)
    # Or a centralized endpoint: its snapshot (after) and, for an app, the one before.
    endpoint: str = ""
    snapshot: str = ""
    before_snapshot: str = ""


def _uploaded_entries(ctx: ServerContext, manifest: list[tuple[str, int]], mid: str) -> list:
    ids = _ids([h for h, _ in manifest])
    lacking = ctx.store.missing_chunks(ids)
    if lacking:
        raise MissingChunks(lacking)
    pieces = [ctx.store.load_chunk(c) for c in ids]
    if content_id(b"".join(pieces)).hex() != mid:
        raise CorruptData("the manifest does not match its id")
    entries = list(decode_manifest(pieces))
    needed = {c for e in entries for c, _ in e.chunks}
    lacking = ctx.store.missing_chunks(needed)
    if lacking:
        raise MissingChunks(lacking)
    return entries


def _endpoint_snapshot(db: Session, ep: Endpoint, ref: str) -> str:
    cvd = db.scalar(select(Cvd).where(Cvd.endpoint_id == ep.id))
    rows = list(db.scalars(select(SnapshotRecord).where(SnapshotRecord.cvd_id == cvd.id)
                           .order_by(SnapshotRecord.time))) if cvd else []
    if not rows:
        raise HTTPException(409, f"endpoint {ep.id[:8]} has not centralized yet")
    if not ref or ref == "latest":
        return rows[-1].id
    hits = [r.id for r in rows if r.id.startswith(ref.lower())]
    if len(hits) != 1:
        raise HTTPException(404, f"no snapshot {ref!r} of endpoint {ep.id[:8]}")
    return hits[0]


def _reference_tree(ctx: ServerContext, db: Session, sid: str, name: str) -> list:
    """A reference endpoint's snapshot without the files of the driver and app layers
    that were applied on it when it was taken (other than an earlier version of the layer
    being captured): those stay their own layers. Identity and user data are left out
    when the layer is saved, by the rules."""
    rec = db.get(SnapshotRecord, sid)
    applied = [r for r in (db.get(Layer, i) for i in (rec.layers if rec else [])) if r]
    others = [r for r in applied if r.kind in ("driver", "app") and r.name != name]
    entries = snapshot_entries(ctx, sid)
    if not others:
        return list(entries)
    base = next((r for r in applied if r.kind == "base"), None)
    return without_layers(entries, snapshot_entries(ctx, base.snapshot) if base else None,
                          [layer_content(ctx, r) for r in others])


def _capture(ctx: ServerContext, body: LayerCommit) -> dict:
    if body.kind not in LAYER_KINDS:
        raise HTTPException(422, f"kind must be one of {', '.join(LAYER_KINDS)}")
    if body.kind == "driver" and not body.match:
        raise HTTPException(422, "a driver layer needs --match (e.g. vendor=Dell*,model=*)")
    if set(body.match) - {"vendor", "model"}:
        raise HTTPException(422, "driver match rules take vendor and model")
    if body.match and body.kind != "driver":
        raise HTTPException(422, "only driver layers take match rules")
    if body.os not in OS_FAMILIES:
        raise HTTPException(422, f"os must be one of {', '.join(OS_FAMILIES)}")
    with ctx.write() as db:
        family = body.os
        if body.endpoint:
            ep = _find_endpoint(db, body.endpoint)
            family = endpoint_family(ep)
            after_sid = _endpoint_snapshot(db, ep, body.snapshot)
            after = _reference_tree(ctx, db, after_sid, body.name)
            source = f"endpoint {ep.id[:8]} snapshot {after_sid[:8]}"
            before = _reference_tree(ctx, db, _endpoint_snapshot(db, ep, body.before_snapshot),
                                     body.name) if body.before_snapshot else None
        elif body.manifest:
            after = _uploaded_entries(ctx, body.manifest, body.manifest_id)
            before = None
            source = body.source or "uploaded tree"
        else:
            raise HTTPException(422, "capture from a directory (manifest) or an endpoint")
        removes = [os.fsencode(p) for p in body.removes]
        if body.kind == "app" and body.endpoint:
            if before is None:
                raise HTTPException(422, "an app layer is the difference between two trees: "
                                         "give the reference machine's tree before the install")
            after, removes = app_difference(before, after)
            source += f" minus {body.before_snapshot[:8]}"
        row = save_layer(ctx, db, kind=body.kind, name=body.name, version=body.version,
                         entries=after, family=family, removes=removes, match=body.match,
                         source=source)
        doc = layer_doc(row)
    ctx.end_upload("admin")
    audit(ctx, "admin", "capture-layer", doc["ref"], kind=body.kind, source=doc["source"],
          files=doc["files"])
    return doc


@router.get("/capture-config")
def capture_config(os_family: str = "linux", ctx: ServerContext = Depends(get_ctx)) -> dict:
    """What a client capturing a tree needs: the store's chunker and the layer rules."""
    from strata.server.layers import rules_doc
    cfg = ctx.store.config
    with ctx.session() as db:
        rules = rules_doc(ctx, db, "windows" if os_family == "windows" else "linux")
    return {"chunker": {"min_size": cfg.chunker.min_size, "avg_size": cfg.chunker.avg_size,
                        "max_size": cfg.chunker.max_size, "zstd_level": cfg.zstd_level or 3},
            "rules": rules}


@router.post("/layers")
def capture_layer(body: LayerCommit, ctx: ServerContext = Depends(get_ctx)) -> dict:
    try:
        return _capture(ctx, body)
    except MissingChunks as exc:
        raise HTTPException(409, f"{len(exc.missing)} chunk(s) of the tree are not on the "
                                 "server: upload them first") from None
    except CorruptData as exc:
        raise HTTPException(422, f"capture rejected: {exc}") from None


# -- list, show, diff, delete ---------------------------------------------------------------

@router.get("/layers")
def list_layers(kind: str | None = None, ctx: ServerContext = Depends(get_ctx)) -> list[dict]:
    if kind and kind not in LAYER_KINDS:
        raise HTTPException(422, f"kind must be one of {', '.join(LAYER_KINDS)}")
    with ctx.session() as db:
        q = select(Layer).order_by(Layer.kind, Layer.name, Layer.created_at)
        if kind:
            q = q.where(Layer.kind == kind)
        return [layer_doc(r) for r in db.scalars(q)]


def _users(db: Session, layer: Layer) -> list[str]:
    """Endpoints the layer is assigned to or applied on. A revoked endpoint no longer
    counts: it never checks in again (after a restore to new hardware, its CVD and the
    snapshots that revert needs have moved to the new endpoint)."""
    revoked = set(db.scalars(select(Endpoint.id).where(Endpoint.state == "revoked")))
    out = []
    for a in db.scalars(select(Assignment)):
        if a.endpoint_id in revoked:
            continue
        if a.base_id == layer.id or layer.id in (a.app_ids or []) \
                or layer.id in (a.driver_ids or []) or layer.id in (a.applied_layers or []):
            out.append(a.endpoint_id)
    return out


@router.get("/layers/{ref}")
def show_layer(ref: str, files: bool = False, ctx: ServerContext = Depends(get_ctx)) -> dict:
    with ctx.session() as db:
        row = _layer(db, ref)
        doc = layer_doc(row)
        doc["removes"] = row.removes
        doc["endpoints"] = _users(db, row)
    if files:
        doc["file_list"] = [display(e.path) for e in snapshot_entries(ctx, row.snapshot)]
    return doc


@router.get("/layers/{a}/diff/{b}")
def diff_layers(a: str, b: str, ctx: ServerContext = Depends(get_ctx)) -> dict:
    with ctx.session() as db:
        la, lb = _layer(db, a), _layer(db, b)
    out: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "metadata": []}
    names = {"+": "added", "-": "removed", "M": "changed", "U": "metadata"}
    size = 0
    for op, e in diff_entries(snapshot_entries(ctx, la.snapshot),
                              snapshot_entries(ctx, lb.snapshot)):
        out[names[op]].append(display(e.path))
        if op in "+M" and e.size:
            size += e.size
    return {"from": f"{la.name}:{la.version}", "to": f"{lb.name}:{lb.version}",
            "counts": {k: len(v) for k, v in out.items()}, "bytes_changed": size, **out}


@router.delete("/layers/{ref}")
def delete_layer(ref: str, ctx: ServerContext = Depends(get_ctx)) -> dict:
    with ctx.write() as db:
        row = _layer(db, ref)
        users = _users(db, row)
        if users:
            raise HTTPException(409, f"layer {row.name}:{row.version} is assigned to or "
                                     f"applied on {len(users)} endpoint(s), e.g. "
                                     f"{users[0][:8]}: assign another layer first")
        referenced = [r.id for r in db.scalars(select(SnapshotRecord))
                      if row.id in (r.layers or [])]
        if referenced:
            raise HTTPException(409, f"layer {row.name}:{row.version} is referenced by "
                                     f"{len(referenced)} snapshot(s) (revert needs it)")
        for a in db.scalars(select(Assignment)):  # only revoked endpoints' can remain
            if a.base_id == row.id:
                a.base_id = None
            if row.id in (a.app_ids or []):
                a.app_ids = [i for i in a.app_ids if i != row.id]
            if row.id in (a.driver_ids or []):
                a.driver_ids = [i for i in a.driver_ids if i != row.id]  # type: ignore[union-attr]
            if row.id in (a.applied_layers or []):
                a.applied_layers = [i for i in a.applied_layers if i != row.id]
        db.flush()
        ctx.store.remove_snapshot(row.snapshot)  # its chunks go at the next prune
        db.delete(row)
        name = f"{row.name}:{row.version}"
    ctx.invalidate()
    audit(ctx, "admin", "delete-layer", name)
    return {"deleted": name}


# -- collections and assignment ---------------------------------------------------------------

class CollectionBody(BaseModel):
    name: str = Field(min_length=1, max_length=128, pattern=COLLECTION_NAME)
    members: list[str] = Field(default_factory=list)
    rule: dict[str, str] = Field(default_factory=dict)  # os, vendor, model, tag: globs


def _matches(ep: Endpoint, rule: dict) -> bool:
    import fnmatch
    hw = (ep.inventory or {}).get("hardware", {})
    facts = {"os": ep.os, "vendor": str(hw.get("vendor", "")),
             "model": str(hw.get("model", "")), "hostname": ep.hostname}
    for key, pat in rule.items():
        if key == "tag":
            if not any(fnmatch.fnmatchcase(t, pat) for t in ep.tags or []):
                return False
        elif not fnmatch.fnmatchcase(facts.get(key, "").lower(), pat.lower()):
            return False
    return True


def collection_members(db: Session, name: str) -> list[Endpoint]:
    coll = db.get(Collection, name)
    if coll is None:
        raise HTTPException(404, f"no collection {name!r}")
    eps = list(db.scalars(select(Endpoint).where(Endpoint.state == "active")))
    return [ep for ep in eps if ep.id in coll.members or (coll.rule and _matches(ep, coll.rule))]


@router.post("/collections")
def create_collection(body: CollectionBody, ctx: ServerContext = Depends(get_ctx)) -> dict:
    if set(body.rule) - {"os", "vendor", "model", "tag", "hostname"}:
        raise HTTPException(422, "collection rules take os, vendor, model, hostname, tag")
    if not body.rule and not body.members:
        raise HTTPException(422, "a collection needs a rule or member endpoints")
    with ctx.write() as db:
        members = [_find_endpoint(db, m).id for m in body.members]
        row = db.get(Collection, body.name) or Collection(name=body.name)
        row.members, row.rule = members, body.rule
        db.add(row)
        db.flush()
        matched = [e.id for e in collection_members(db, body.name)]
    audit(ctx, "admin", "set-collection", body.name, members=len(members), rule=body.rule)
    return {"name": body.name, "members": members, "rule": body.rule, "endpoints": matched}


@router.get("/collections")
def list_collections(ctx: ServerContext = Depends(get_ctx)) -> list[dict]:
    with ctx.session() as db:
        return [{"name": c.name, "rule": c.rule, "members": c.members,
                 "endpoints": [e.id for e in collection_members(db, c.name)]}
                for c in db.scalars(select(Collection).order_by(Collection.name))]


@router.delete("/collections/{name}")
def delete_collection(name: str, ctx: ServerContext = Depends(get_ctx)) -> dict:
    with ctx.write() as db:
        row = db.get(Collection, name)
        if row is None:
            raise HTTPException(404, f"no collection {name!r}")
        db.delete(row)
    audit(ctx, "admin", "delete-collection", name)
    return {"deleted": name}


class TagBody(BaseModel):
    tags: list[str] = Field(max_length=64)


@router.put("/endpoints/{ref}/tags")
def set_tags(ref: str, body: TagBody, ctx: ServerContext = Depends(get_ctx)) -> dict:
    with ctx.write() as db:
        ep = _find_endpoint(db, ref)
        ep.tags = sorted(set(body.tags))
        tags, eid = ep.tags, ep.id
    ctx.invalidate()
    audit(ctx, "admin", "tag-endpoint", eid, tags=tags)
    return {"endpoint": eid, "tags": tags}


class AssignBody(BaseModel):
    endpoints: list[str] = Field(default_factory=list)
    collection: str = ""
    all: bool = False
    base: str | None = None
    apps: list[str] | None = None  # None: leave as is; []: remove all apps
    drivers: list[str] | None = None  # None: leave as is; []: back to "by hardware"
    enforce: bool | None = None


def targets(db: Session, endpoints: list[str], collection: str, every: bool) -> list[Endpoint]:
    if sum(bool(x) for x in (endpoints, collection, every)) != 1:
        raise HTTPException(422, "name endpoints, a collection, or all")
    if every:
        return list(db.scalars(select(Endpoint).where(Endpoint.state == "active")))
    if collection:
        return collection_members(db, collection)
    return [_find_endpoint(db, e) for e in endpoints]


def assignment(db: Session, ep: Endpoint) -> Assignment:
    a = db.get(Assignment, ep.id)
    if a is None:
        a = Assignment(endpoint_id=ep.id, app_ids=[], applied_layers=[], operation={})
        db.add(a)
    return a


def _assign(db: Session, eps: list[Endpoint], body: AssignBody, task: Task | None = None
            ) -> list[str]:
    base = _layer(db, body.base, "base") if body.base else None
    apps = [_layer(db, r, "app") for r in body.apps] if body.apps is not None else None
    drivers = [_layer(db, r, "driver") for r in body.drivers] \
        if body.drivers is not None else None
    for ep in eps:
        a = assignment(db, ep)
        if base is not None:
            a.base_id = base.id
        if apps is not None:
            a.app_ids = [r.id for r in apps]
        if drivers is not None:
            a.driver_ids = [r.id for r in drivers] or None
        if body.enforce is not None:
            a.enforce = body.enforce
        if task is not None:
            a.task_id = task.id
        set_state(a, "assigned", percent=0.0)
    return [ep.id for ep in eps]


@router.post("/assign", dependencies=[Depends(signing_required)])
def assign(body: AssignBody, ctx: ServerContext = Depends(get_ctx)) -> dict:
    if body.base is None and body.apps is None and body.drivers is None \
            and body.enforce is None:
        raise HTTPException(422, "nothing to assign: give a base, apps, drivers or enforce")
    with ctx.write() as db:
        eps = targets(db, body.endpoints, body.collection, body.all)
        done = _assign(db, eps, body)
    ctx.invalidate()
    audit(ctx, "admin", "assign", body.collection or ("all" if body.all else ",".join(done)),
          base=body.base, apps=body.apps, drivers=body.drivers, enforce=body.enforce,
          endpoints=len(done))
    return {"endpoints": done, "base": body.base, "apps": body.apps}


# -- dry-run and compliance -------------------------------------------------------------------

class DryRunBody(BaseModel):
    endpoint: str
    base: str | None = None
    apps: list[str] | None = None


@router.post("/layers/dry-run")
def dry_run(body: DryRunBody, ctx: ServerContext = Depends(get_ctx)) -> dict:
    """What an update would change on an endpoint, and every conflict, before any update."""
    with ctx.session() as db:
        ep = _find_endpoint(db, body.endpoint)
        snap = latest_snapshot(db, ep.id)
        if snap is None:
            raise HTTPException(409, f"endpoint {ep.id[:8]} has not centralized yet")
        a = db.get(Assignment, ep.id) or Assignment(endpoint_id=ep.id, app_ids=[],
                                                    applied_layers=[])
        current = assigned_layers(db, a, ep)
        base = _layer(db, body.base, "base") if body.base else \
            next((r for r in current if r.kind == "base"), None)
        apps = [_layer(db, r, "app") for r in body.apps] if body.apps is not None \
            else [r for r in current if r.kind == "app"]
        drivers = [r for r in current if r.kind == "driver"]
        family = endpoint_family(ep)
        rules = rules_for(ctx, db, family)
        new = [r for r in (base, *drivers, *apps) if r is not None]
        owned = image_of(ctx, db, list(a.applied_layers or []), family)
        free = min((d.get("free_bytes", 0) for d in (ep.inventory or {}).get("disks", [])),
                   default=None)
    image = build_image([layer_content(ctx, r) for r in new], rules)
    entries = list(snapshot_entries(ctx, snap.id))
    plan = plan_update(entries, image, rules, owned=owned.entries)
    # Account databases merged as the agent will (clashes show as account-clash).
    resolve_merges(plan, StoreInputs(ctx.store.load_chunk), rules.family, time.time_ns())
    have = {c for e in entries for c, _ in e.chunks}
    need = plan.chunk_ids() - have
    report = plan.summary(limit=500)
    need_bytes = report["bytes_to_write"]
    if free is not None and need_bytes > free:
        report["conflict_list"].insert(0, {"kind": "disk-space", "path": "/",
                                           "detail": f"needs {need_bytes} bytes, "
                                                     f"{free} free"})
        report["conflicts"]["disk-space"] = 1
    report.update({"endpoint": ep.id, "snapshot": snap.id,
                   "layers": [f"{r.kind} {r.name}:{r.version}" for r in new],
                   "chunks_to_download": len(need),
                   "free_bytes": free})
    return report


def compliance_of(ctx: ServerContext, db: Session, ep: Endpoint) -> dict:
    a = db.get(Assignment, ep.id)
    snap = latest_snapshot(db, ep.id)
    if a is None or not a.applied_layers:
        return {"endpoint": ep.id, "hostname": ep.hostname, "state": "no layers applied"}
    if snap is None:
        return {"endpoint": ep.id, "hostname": ep.hostname, "state": "not centralized"}
    family = endpoint_family(ep)
    image = image_of(ctx, db, list(a.applied_layers), family)
    report = check_compliance(snapshot_entries(ctx, snap.id), image, rules_for(ctx, db, family))
    return {"endpoint": ep.id, "hostname": ep.hostname, "snapshot": snap.id,
            "snapshot_time": snap.time, "enforce": a.enforce, **report.to_dict()}


@router.get("/compliance")
def compliance(endpoint: str | None = None, ctx: ServerContext = Depends(get_ctx)) -> dict:
    with ctx.session() as db:
        eps = [_find_endpoint(db, endpoint)] if endpoint else list(db.scalars(
            select(Endpoint).where(Endpoint.state == "active").order_by(Endpoint.enrolled_at)))
        reports = [compliance_of(ctx, db, ep) for ep in eps]
    per_layer: dict[str, list[float]] = {}
    for r in reports:
        for label, figures in r.get("layers", {}).items():
            per_layer.setdefault(label, []).append(figures["score"])
    return {"endpoints": reports,
            "layers": {k: round(sum(v) / len(v), 2) for k, v in per_layer.items()}}


# -- revert, restore to new hardware, provisioning, migration --------------------------------

class RevertBody(BaseModel):
    snapshot: str
    keep_user_apps: bool = False


@router.post("/endpoints/{ref}/revert", dependencies=[Depends(signing_required)])
def revert(ref: str, body: RevertBody, ctx: ServerContext = Depends(get_ctx)) -> dict:
    """System layers back to a snapshot; user data stays as it is now."""
    with ctx.write() as db:
        ep = _find_endpoint(db, ref)
        sid = _endpoint_snapshot(db, ep, body.snapshot)
        rec = db.get(SnapshotRecord, sid)
        a = assignment(db, ep)
        layers = [db.get(Layer, i) for i in (rec.layers if rec else [])]
        a.base_id = next((r.id for r in layers if r is not None and r.kind == "base"), None)
        a.app_ids = [r.id for r in layers if r is not None and r.kind == "app"]
        a.operation = {"kind": "revert", "snapshot": sid, "keep_user_apps": body.keep_user_apps}
        set_state(a, "assigned", percent=0.0)
        eid = ep.id
    ctx.invalidate()
    audit(ctx, "admin", "revert", eid, snapshot=sid, keep_user_apps=body.keep_user_apps)
    return {"endpoint": eid, "snapshot": sid, "state": "assigned"}


class RestoreBody(BaseModel):
    to_endpoint: str


@router.post("/endpoints/{ref}/restore", dependencies=[Depends(signing_required)])
def restore_to(ref: str, body: RestoreBody, ctx: ServerContext = Depends(get_ctx)) -> dict:
    """Full restore of a CVD onto another (new) endpoint: the CVD moves there, identity
    follows it, and the driver layer is chosen again for the new hardware."""
    with ctx.write() as db:
        old, new = _find_endpoint(db, ref), _find_endpoint(db, body.to_endpoint)
        if old.id == new.id:
            raise HTTPException(422, "restore to the same endpoint is a revert")
        sid = _endpoint_snapshot(db, old, "latest")
        old_a = db.get(Assignment, old.id)
        old_drivers = [db.get(Layer, i) for i in (old_a.applied_layers if old_a else [])]
        removes = _driver_paths(ctx, sid, [d for d in old_drivers
                                           if d is not None and d.kind == "driver"])
        # The CVDs swap contents: the new machine takes the snapshot stream, the old
        # record keeps whatever the new one had centralized before.
        c_old = db.scalar(select(Cvd).where(Cvd.endpoint_id == old.id))
        c_new = db.scalar(select(Cvd).where(Cvd.endpoint_id == new.id))
        assert c_old is not None and c_new is not None
        moving = list(db.scalars(select(SnapshotRecord).where(SnapshotRecord.cvd_id == c_old.id)))
        staying = list(db.scalars(select(SnapshotRecord)
                                  .where(SnapshotRecord.cvd_id == c_new.id)))
        for r in moving:
            r.cvd_id = c_new.id
        for r in staying:
            r.cvd_id = c_old.id
        c_old.last_snapshot, c_new.last_snapshot = c_new.last_snapshot, c_old.last_snapshot
        a = assignment(db, new)
        a.base_id = old_a.base_id if old_a else None
        a.app_ids = list(old_a.app_ids) if old_a else []
        a.driver_ids = None
        a.operation = {"kind": "restore", "snapshot": sid, "removes": removes,
                       "from": old.id}
        set_state(a, "assigned", percent=0.0)
        old.state = "revoked"
        new.hostname = old.hostname
        ids = (old.id, new.id)
    ctx.invalidate()
    audit(ctx, "admin", "restore-to-endpoint", ids[1], source=ids[0], snapshot=sid)
    return {"from": ids[0], "to": ids[1], "snapshot": sid, "state": "assigned"}


def _driver_paths(ctx: ServerContext, sid: str, drivers: list[Layer]) -> list[str]:
    """What the old hardware's driver layers put in a snapshot: their files, and their
    directories unless something else lives in them."""
    files: set[bytes] = set()
    dirs: set[bytes] = set()
    for d in drivers:
        for e in snapshot_entries(ctx, d.snapshot):
            (dirs if e.type is EntryType.DIR else files).add(e.path)
    shared: set[bytes] = set()
    for e in snapshot_entries(ctx, sid):
        if e.path not in files and e.path not in dirs:
            p = e.path
            while b"/" in p:
                p = p.rpartition(b"/")[0]
                shared.add(p)
    return sorted(os.fsdecode(p) for p in files | (dirs - shared))


class ProvisionBody(BaseModel):
    base: str
    apps: list[str] = Field(default_factory=list)


@router.post("/endpoints/{ref}/provision", dependencies=[Depends(signing_required)])
def provision(ref: str, body: ProvisionBody, ctx: ServerContext = Depends(get_ctx)) -> dict:
    with ctx.write() as db:
        ep = _find_endpoint(db, ref)
        _assign(db, [ep], AssignBody(endpoints=[ep.id], base=body.base, apps=body.apps))
        a = assignment(db, ep)
        a.operation = {"kind": "provision"}
        eid = ep.id
    ctx.invalidate()
    audit(ctx, "admin", "provision", eid, base=body.base, apps=body.apps)
    return {"endpoint": eid, "base": body.base, "apps": body.apps, "state": "assigned"}


class MigrateBody(BaseModel):
    endpoints: list[str] = Field(default_factory=list)
    collection: str = ""
    base: str | None = None
    drivers: list[str] | None = None


@router.post("/migrate", dependencies=[Depends(signing_required)])
def migrate(body: MigrateBody, ctx: ServerContext = Depends(get_ctx)) -> dict:
    """Re-base endpoints onto another base (OS migration) or driver layer (hardware
    migration) as one tracked task; each endpoint snapshots itself before the switch."""
    if body.base is None and body.drivers is None:
        raise HTTPException(422, "migrate to a --base or --driver layer")
    with ctx.write() as db:
        eps = targets(db, body.endpoints, body.collection, False)
        task = Task(kind="migrate", params=body.model_dump(), endpoints=[e.id for e in eps])
        db.add(task)
        db.flush()
        _assign(db, eps, AssignBody(base=body.base, drivers=body.drivers,
                                    endpoints=[e.id for e in eps]), task)
        tid = task.id
    ctx.invalidate()
    audit(ctx, "admin", "migrate", str(tid), base=body.base, drivers=body.drivers,
          endpoints=len(eps))
    return task_doc_by_id(ctx, tid)


def task_doc_by_id(ctx: ServerContext, tid: int) -> dict:
    with ctx.session() as db:
        task = db.get(Task, tid)
        if task is None:
            raise HTTPException(404, f"no task {tid}")
        rows = []
        for eid in task.endpoints:
            a, ep = db.get(Assignment, eid), db.get(Endpoint, eid)
            mine = a is not None and a.task_id == task.id
            rows.append({"endpoint": eid, "hostname": ep.hostname if ep else "",
                         "state": a.state if mine else "superseded",
                         "percent": round(a.percent, 1) if mine else 0.0,
                         "detail": a.detail if mine else ""})
        done = sum(r["state"] == "applied" for r in rows)
        failed = sum(r["state"] == "failed" for r in rows)
        return {"id": task.id, "kind": task.kind, "params": task.params,
                "created_at": task.created_at, "endpoints": rows,
                "progress": round(100.0 * done / len(rows), 1) if rows else 100.0,
                "state": "done" if done == len(rows) else ("failed" if failed else "running")}


@router.get("/tasks")
def list_tasks(ctx: ServerContext = Depends(get_ctx)) -> list[dict]:
    with ctx.session() as db:
        ids = list(db.scalars(select(Task.id).order_by(Task.id)))
    return [task_doc_by_id(ctx, t) for t in ids]


@router.get("/tasks/{tid}")
def show_task(tid: int, ctx: ServerContext = Depends(get_ctx)) -> dict:
    return task_doc_by_id(ctx, tid)

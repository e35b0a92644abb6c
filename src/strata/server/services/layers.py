"""IT layers: capture (from an uploaded tree or a centralized reference endpoint),
storing, listing, showing, comparing and deleting them, and the layer rules and images
built from them.

A layer's manifest is kept in the store as a snapshot (host ``layer:NAME:VERSION``), so
its chunks are shared with every CVD and prune keeps them; the catalog row says what it
is. Layer rules are enforced here as well as on the agent: whatever a manifest carries,
a stored layer never holds identity, user data or what belongs to no layer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from strata.engine.backup import store_manifest
from strata.engine.diff import diff_entries
from strata.errors import Conflict, CorruptData, Invalid, MissingChunks
from strata.layers.capture import app_difference, without_layers
from strata.layers.image import KIND_ORDER, Image, LayerContent, build_image
from strata.layers.rules import LayerRules, os_family
from strata.model.admin import (
    CaptureConfig,
    Deleted,
    DiffCounts,
    LayerCaptureRequest,
    LayerDetail,
    LayerDetailWithFiles,
    LayerDiff,
    LayerInfo,
)
from strata.model.entry import Entry, EntryType
from strata.model.ids import content_id
from strata.model.manifest import encode_manifest
from strata.model.names import LAYER_KINDS, OS_FAMILIES
from strata.model.snapshot import Snapshot, now_iso
from strata.model.wire import ChunkerSpec
from strata.server.catalog.models import Assignment, Endpoint, Layer, SnapshotRecord
from strata.server.context import ServerContext
from strata.server.services import audit, snapshots
from strata.server.services.facts import endpoint_family
from strata.server.services.lookup import find_endpoint, find_layer
from strata.server.services.manifests import verify_manifest
from strata.server.services.policies import cached_policy
from strata.tree.order import path_key
from strata.tree.scan import display

ADMIN_UPLOADS = "admin"  # the upload session of an administrator's capture


# -- rules and images -----------------------------------------------------------------------


def rules_doc(ctx: ServerContext, db: Session, family: str) -> dict[str, list[str]]:
    return dict(cached_policy(ctx, db, "layers").get(family, {}))


def rules_for(ctx: ServerContext, db: Session, family: str) -> LayerRules:
    return LayerRules.from_doc(rules_doc(ctx, db, family), family)


def layer_content(ctx: ServerContext, layer: Layer) -> LayerContent:
    return LayerContent(label=f"{layer.kind} {layer.name}:{layer.version}", kind=layer.kind,
                        entries=snapshots.entries(ctx, layer.snapshot),
                        removes=[os.fsencode(p) for p in layer.removes])


def image_of(ctx: ServerContext, db: Session, layer_ids: list[int], family: str) -> Image:
    """The tree these layers lay down together, in merge order."""
    rows = sorted([r for r in (db.get(Layer, i) for i in layer_ids) if r is not None],
                  key=lambda r: KIND_ORDER[r.kind])
    return build_image([layer_content(ctx, r) for r in rows], rules_for(ctx, db, family))


def label(layer: Layer) -> str:
    return f"{layer.kind} {layer.name}:{layer.version}"


# -- storing ----------------------------------------------------------------------------------


def save_layer(ctx: ServerContext, db: Session, *, kind: str, name: str, version: str,
               entries: Iterable[Entry], family: str, removes: list[bytes] | None = None,
               match: dict[str, str] | None = None, source: str = "") -> Layer:
    """Filter `entries` by the layer rules, store them as the layer's manifest, record it."""
    if kind not in LAYER_KINDS:
        raise Invalid(f"kind must be one of {', '.join(LAYER_KINDS)}")
    if db.scalar(select(Layer).where(Layer.name == name, Layer.version == version)):
        raise Conflict(f"layer {name}:{version} already exists")
    rules = rules_for(ctx, db, family)
    kept = sorted((e for e in entries if rules.layer_may_carry(e.path,
                                                                 e.type is EntryType.DIR)),
                  key=lambda e: path_key(e.path))
    # A layer is the same on every machine: no ctime, inode or device (model/manifest.py).
    manifest_bytes = b"".join(encode_manifest(kept, stat_keys=False))
    store = ctx.store
    manifest = store_manifest(store, manifest_bytes)
    referenced = {c for c, _ in manifest}
    for e in kept:
        referenced.update(c for c, _ in e.chunks)
    files = sum(1 for e in kept if e.type is EntryType.FILE)
    nbytes = sum(e.size for e in kept if e.type is EntryType.FILE)
    snap = Snapshot(time=now_iso(), host=f"layer:{name}:{version}", paths=[],
                    manifest=[(c.hex(), n) for c, n in manifest],
                    manifest_id=content_id(manifest_bytes).hex(), tags=["layer", kind],
                    trigger="layer", stats={"files": files, "bytes_total": nbytes})
    sid = store.commit_snapshot(snap, referenced)
    # IT content: any endpoint may learn the server holds it (and then proves it has it);
    # an endpoint it is assigned to holds it.
    ctx.holdings.share(c for e in kept for c, _ in e.chunks)
    ctx.holdings.index_snapshot(sid, lambda: referenced)
    row = Layer(kind=kind, name=name, version=version, snapshot=sid, os=family,
                match=match or {}, removes=[os.fsdecode(p) for p in removes or []],
                files=files, bytes=nbytes, source=source)
    db.add(row)
    db.flush()
    return row


def layer_info(row: Layer) -> LayerInfo:
    return LayerInfo(id=row.id, kind=row.kind, name=row.name, version=row.version,
                     ref=f"{row.name}:{row.version}", snapshot=row.snapshot, os=row.os,
                     match=row.match, removes=len(row.removes), files=row.files,
                     bytes=row.bytes, source=row.source, created_at=row.created_at)


# -- capture ----------------------------------------------------------------------------------


def capture_config(ctx: ServerContext, family: str) -> CaptureConfig:
    cfg = ctx.store.config
    with ctx.session() as db:
        rules = rules_doc(ctx, db, os_family(family))
    return CaptureConfig(chunker=ChunkerSpec(min_size=cfg.chunker.min_size,
                                             avg_size=cfg.chunker.avg_size,
                                             max_size=cfg.chunker.max_size,
                                             zstd_level=cfg.zstd_level or 3),
                         rules=rules)


def _check_capture(req: LayerCaptureRequest) -> None:
    if req.kind not in LAYER_KINDS:
        raise Invalid(f"kind must be one of {', '.join(LAYER_KINDS)}")
    if req.kind == "driver" and not req.match:
        raise Invalid("a driver layer needs --match (e.g. vendor=Dell*,model=*)")
    if set(req.match) - {"vendor", "model"}:
        raise Invalid("driver match rules take vendor and model")
    if req.match and req.kind != "driver":
        raise Invalid("only driver layers take match rules")
    if req.os not in OS_FAMILIES:
        raise Invalid(f"os must be one of {', '.join(OS_FAMILIES)}")


def capture(ctx: ServerContext, req: LayerCaptureRequest, *, actor: str) -> LayerInfo:
    """Record a layer from a tree the administrator uploaded (its manifest) or from a
    centralized reference endpoint's snapshot; an app layer from an endpoint is the
    difference between its snapshots after and before the install."""
    _check_capture(req)
    try:
        with ctx.write() as db:
            row = _capture(ctx, db, req)
            info = layer_info(row)
    except MissingChunks as exc:
        raise Conflict(f"{len(exc.missing)} chunk(s) of the tree are not on the server: "
                       "upload them first") from None
    except CorruptData as exc:
        raise Invalid(f"capture rejected: {exc}") from None
    ctx.end_upload(ADMIN_UPLOADS)
    audit.record(ctx, actor, "capture-layer", info.ref, kind=req.kind, source=info.source,
                 files=info.files)
    return info


def _reference_tree(ctx: ServerContext, db: Session, sid: str, name: str) -> list[Entry]:
    """A reference endpoint's snapshot without the files of the driver and app layers
    that were applied on it when it was taken (other than an earlier version of the layer
    being captured): those stay their own layers. Identity and user data are left out
    when the layer is saved, by the rules."""
    rec = db.get(SnapshotRecord, sid)
    applied = [r for r in (db.get(Layer, i) for i in (rec.layers if rec else [])) if r]
    others = [r for r in applied if r.kind in ("driver", "app") and r.name != name]
    entries = snapshots.entries(ctx, sid)
    if not others:
        return list(entries)
    base = next((r for r in applied if r.kind == "base"), None)
    return without_layers(entries, snapshots.entries(ctx, base.snapshot) if base else None,
                          [layer_content(ctx, r) for r in others])


def _capture(ctx: ServerContext, db: Session, req: LayerCaptureRequest) -> Layer:
    family = req.os
    if req.endpoint:
        ep = find_endpoint(db, req.endpoint)
        family = endpoint_family(ep)
        after_sid = snapshots.find_snapshot(db, ep.id, req.snapshot).id
        after = _reference_tree(ctx, db, after_sid, req.name)
        source = f"endpoint {ep.id[:8]} snapshot {after_sid[:8]}"
        before = _reference_tree(
            ctx, db, snapshots.find_snapshot(db, ep.id, req.before_snapshot).id, req.name) \
            if req.before_snapshot else None
    elif req.manifest:
        after = verify_manifest(ctx.store, req.manifest, req.manifest_id, keep_entries=True,
                                require_file_chunks=True).entries
        before = None
        source = req.source or "uploaded tree"
    else:
        raise Invalid("capture from a directory (manifest) or an endpoint")
    removes = [os.fsencode(p) for p in req.removes]
    if req.kind == "app" and req.endpoint:
        if before is None:
            raise Invalid("an app layer is the difference between two trees: give the "
                          "reference machine's tree before the install")
        after, removes = app_difference(before, after)
        source += f" minus {req.before_snapshot[:8]}"
    return save_layer(ctx, db, kind=req.kind, name=req.name, version=req.version,
                      entries=after, family=family, removes=removes, match=req.match,
                      source=source)


# -- list, show, diff, delete -----------------------------------------------------------------


def list_layers(ctx: ServerContext, kind: str | None = None) -> list[LayerInfo]:
    if kind and kind not in LAYER_KINDS:
        raise Invalid(f"kind must be one of {', '.join(LAYER_KINDS)}")
    with ctx.session() as db:
        q = select(Layer).order_by(Layer.kind, Layer.name, Layer.created_at)
        if kind:
            q = q.where(Layer.kind == kind)
        return [layer_info(r) for r in db.scalars(q)]


def layer_users(db: Session, layer: Layer) -> list[str]:
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


def show_layer(ctx: ServerContext, ref: str, files: bool = False) -> LayerDetail:
    with ctx.session() as db:
        row = find_layer(db, ref)
        detail = LayerDetail(**layer_info(row).model_dump(exclude={"removes"}),
                             removes=row.removes, endpoints=layer_users(db, row))
    if files:
        return LayerDetailWithFiles(**detail.model_dump(), file_list=[
            display(e.path) for e in snapshots.entries(ctx, row.snapshot)])
    return detail


def diff_layers(ctx: ServerContext, a: str, b: str) -> LayerDiff:
    with ctx.session() as db:
        la, lb = find_layer(db, a), find_layer(db, b)
    out: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "metadata": []}
    names = {"+": "added", "-": "removed", "M": "changed", "U": "metadata"}
    size = 0
    for op, e in diff_entries(snapshots.entries(ctx, la.snapshot),
                              snapshots.entries(ctx, lb.snapshot)):
        out[names[op]].append(display(e.path))
        if op in "+M" and e.size:
            size += e.size
    return LayerDiff(**{"from": f"{la.name}:{la.version}"}, to=f"{lb.name}:{lb.version}",
                     counts=DiffCounts(**{k: len(v) for k, v in out.items()}),
                     bytes_changed=size, added=out["added"], removed=out["removed"],
                     changed=out["changed"], metadata=out["metadata"])


def delete_layer(ctx: ServerContext, ref: str, *, actor: str) -> Deleted:
    """Refused while the layer is assigned, applied, or referenced by a snapshot (revert
    needs it); its chunks go at the next prune."""
    with ctx.write() as db:
        row = find_layer(db, ref)
        users = layer_users(db, row)
        if users:
            raise Conflict(f"layer {row.name}:{row.version} is assigned to or applied on "
                           f"{len(users)} endpoint(s), e.g. {users[0][:8]}: assign another "
                           "layer first")
        referenced = [r.id for r in db.scalars(select(SnapshotRecord))
                      if row.id in (r.layers or [])]
        if referenced:
            raise Conflict(f"layer {row.name}:{row.version} is referenced by "
                           f"{len(referenced)} snapshot(s) (revert needs it)")
        for a in db.scalars(select(Assignment)):  # only revoked endpoints' can remain
            if a.base_id == row.id:
                a.base_id = None
            if row.id in (a.app_ids or []):
                a.app_ids = [i for i in a.app_ids if i != row.id]
            if row.id in (a.driver_ids or []):
                a.driver_ids = [i for i in a.driver_ids or [] if i != row.id]
            if row.id in (a.applied_layers or []):
                a.applied_layers = [i for i in a.applied_layers if i != row.id]
        db.flush()
        ctx.store.remove_snapshot(row.snapshot)
        db.delete(row)
        name = f"{row.name}:{row.version}"
    ctx.invalidate()
    audit.record(ctx, actor, "delete-layer", name)
    return Deleted(deleted=name)

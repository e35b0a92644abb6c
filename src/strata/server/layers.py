"""Layers on the server: storing them, choosing them for an endpoint (assignment,
drivers by hardware, one-off operations), and comparing endpoints against them.

A layer's manifest is kept in the store as a snapshot (host ``layer:NAME:VERSION``), so
its chunks are shared with every CVD and prune keeps them; the catalog row says what it
is. Layer rules are enforced here as well as on the agent: whatever a manifest carries,
a stored layer never holds identity, user data or what belongs to no layer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

from fastapi import HTTPException
from sqlalchemy import select
from sqlalchemy.orm import Session

from strata.engine.backup import store_manifest
from strata.layers.hardware import hardware_facts, rule_matches
from strata.layers.image import KIND_ORDER, Image, LayerContent, build_image
from strata.layers.rules import LayerRules, os_family
from strata.model.entry import Entry, EntryType
from strata.model.ids import content_id
from strata.model.manifest import encode_manifest
from strata.model.names import LAYER_KINDS
from strata.model.snapshot import Snapshot, now_iso
from strata.model.wire import DesiredLayer, DesiredState
from strata.server.catalog.models import Assignment, Cvd, Endpoint, Layer, SnapshotRecord
from strata.server.context import ServerContext
from strata.server.policies import get_policy
from strata.tree.order import path_key


def rules_doc(ctx: ServerContext, db: Session, family: str) -> dict:
    doc = ctx.cached("policy:layers", lambda: get_policy(db, "layers"))
    return dict(doc.get(family, {}))  # type: ignore[union-attr]


def rules_for(ctx: ServerContext, db: Session, family: str) -> LayerRules:
    return LayerRules.from_doc(rules_doc(ctx, db, family), family)


def snapshot_entries(ctx: ServerContext, sid: str) -> Iterator[Entry]:
    return ctx.store.iter_manifest(ctx.store.load_snapshot(sid))


def snapshot_manifest_bytes(ctx: ServerContext, sid: str) -> bytes:
    """A snapshot's (or layer's) manifest as agents download it, and as its signed digest
    is computed."""
    snap = ctx.store.load_snapshot(sid)
    return b"".join(ctx.store.load_chunk(c) for c in snap.manifest_chunk_ids())


def layer_content(ctx: ServerContext, layer: Layer) -> LayerContent:
    return LayerContent(label=f"{layer.kind} {layer.name}:{layer.version}", kind=layer.kind,
                        entries=snapshot_entries(ctx, layer.snapshot),
                        removes=[os.fsencode(p) for p in layer.removes])


def find_layer(db: Session, ref: str, kind: str | None = None) -> Layer:
    """A layer by id or NAME:VERSION (NAME alone: its newest version)."""
    if ref.isdigit():
        row = db.get(Layer, int(ref))
    else:
        name, _, version = ref.partition(":")
        q = select(Layer).where(Layer.name == name)
        q = q.where(Layer.version == version) if version else \
            q.order_by(Layer.created_at.desc(), Layer.id.desc())
        row = db.scalars(q).first()
    if row is None:
        raise HTTPException(404, f"no layer {ref!r}")
    if kind and row.kind != kind:
        raise HTTPException(422, f"layer {ref!r} is a {row.kind} layer, not {kind}")
    return row


def save_layer(ctx: ServerContext, db: Session, *, kind: str, name: str, version: str,
               entries: Iterable[Entry], family: str, removes: list[bytes] | None = None,
               match: dict | None = None, source: str = "") -> Layer:
    """Filter `entries` by the layer rules, store them as the layer's manifest, record it."""
    if kind not in LAYER_KINDS:
        raise HTTPException(422, f"kind must be one of {', '.join(LAYER_KINDS)}")
    if db.scalar(select(Layer).where(Layer.name == name, Layer.version == version)):
        raise HTTPException(409, f"layer {name}:{version} already exists")
    rules = rules_for(ctx, db, family)
    kept = sorted((e for e in entries if rules.layer_may_carry(e.path,
                                                                 e.type is EntryType.DIR)),
                  key=lambda e: path_key(e.path))
    manifest_bytes = b"".join(encode_manifest(kept))
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
    row = Layer(kind=kind, name=name, version=version, snapshot=sid, os=family,
                match=match or {}, removes=[os.fsdecode(p) for p in removes or []],
                files=files, bytes=nbytes, source=source)
    db.add(row)
    db.flush()
    return row


def endpoint_family(ep: Endpoint) -> str:
    return os_family(ep.os or str((ep.inventory or {}).get("os", "")))


def drivers_for(db: Session, inventory: dict) -> list[Layer]:
    """The driver layers whose rules match this hardware: the newest version of each name."""
    facts = hardware_facts(inventory)
    chosen: dict[str, Layer] = {}
    for layer in db.scalars(select(Layer).where(Layer.kind == "driver")
                            .order_by(Layer.created_at, Layer.id)):
        if rule_matches(layer.match or {}, facts):
            chosen[layer.name] = layer  # later rows are newer versions
    return list(chosen.values())


def assigned_layers(db: Session, a: Assignment, ep: Endpoint) -> list[Layer]:
    """The endpoint's IT layers in merge order: base, drivers, apps."""
    rows: list[Layer] = []
    if a.base_id is not None:
        rows.append(db.get(Layer, a.base_id))  # type: ignore[arg-type]
    if a.driver_ids is not None:
        rows += [r for r in (db.get(Layer, i) for i in a.driver_ids) if r is not None]
    else:
        rows += drivers_for(db, ep.inventory or {})
    rows += [r for r in (db.get(Layer, i) for i in a.app_ids) if r is not None]
    return sorted([r for r in rows if r is not None], key=lambda r: KIND_ORDER[r.kind])


def _desired_layer(layer: Layer) -> DesiredLayer:
    return DesiredLayer(id=layer.id, kind=layer.kind, name=layer.name, version=layer.version,
                        snapshot=layer.snapshot, removes=list(layer.removes))


def desired_state(ctx: ServerContext, db: Session, ep: Endpoint) -> DesiredState | None:
    """What the endpoint should converge to, or None when nothing is assigned."""
    a = db.get(Assignment, ep.id)
    if a is None:
        return None
    family = endpoint_family(ep)
    layers = [_desired_layer(r) for r in assigned_layers(db, a, ep)]
    owned = None
    op = dict(a.operation or {})
    kind = op.get("kind", "update")
    if kind in ("revert", "restore"):
        # The system comes from a CVD snapshot; afterwards the layers it was taken with
        # (drivers re-chosen for this hardware) are what IT owns on the endpoint.
        owned = layers
        snap_layer = DesiredLayer(id=None, kind="snapshot", name="snapshot",
                                  version=op["snapshot"][:8], snapshot=op["snapshot"],
                                  removes=list(op.get("removes", [])))
        drivers = [d for d in layers if d.kind == "driver"] if kind == "restore" else []
        layers = [snap_layer, *drivers]
    doc = {"layers": [dl.model_dump() for dl in layers],
           "owned": [dl.model_dump() for dl in owned] if owned is not None else None,
           "op": op}  # not `enforce`: turning it on repairs, it is not a new image
    key = hashlib.blake2b(json.dumps(doc, sort_keys=True).encode(), digest_size=12).hexdigest()
    return DesiredState(key=key, layers=layers, owned=owned, operation=kind,
                        keep_user_apps=bool(op.get("keep_user_apps")),
                        enforce=a.enforce, family=family, rules=rules_doc(ctx, db, family))


def cached_desired(ctx: ServerContext, ep: Endpoint) -> DesiredState | None:
    def load() -> tuple[DesiredState | None]:
        with ctx.session() as db:
            return (desired_state(ctx, db, ep),)
    return ctx.cached(f"desired:{ep.id}", load)[0]  # type: ignore[index]


def mark_applied(ctx: ServerContext, endpoint_id: str, desired: DesiredState) -> bool:
    """The endpoint already has its desired state (e.g. a migration to the layers it runs):
    record it as applied without an update."""
    with ctx.write() as db:
        a = db.get(Assignment, endpoint_id)
        if a is not None and a.state != "applied":
            set_state(a, "applied", percent=100.0)
            a.applied_key = desired.key
    return True


def image_of(ctx: ServerContext, db: Session, layer_ids: list[int], family: str) -> Image:
    rows = sorted([r for r in (db.get(Layer, i) for i in layer_ids) if r is not None],
                  key=lambda r: KIND_ORDER[r.kind])
    return build_image([layer_content(ctx, r) for r in rows], rules_for(ctx, db, family))


def latest_snapshot(db: Session, endpoint_id: str) -> SnapshotRecord | None:
    cvd = db.scalar(select(Cvd).where(Cvd.endpoint_id == endpoint_id))
    if cvd is None or cvd.last_snapshot is None:
        return None
    return db.get(SnapshotRecord, cvd.last_snapshot)


def set_state(a: Assignment, state: str, *, percent: float | None = None,
              detail: str = "") -> None:
    a.state = state
    if state == "assigned":  # a new desired state: nothing of it is downloaded yet
        a.downloaded_bytes = 0
    if percent is not None:
        a.percent = percent
    a.detail = detail
    a.updated_at = datetime.now(UTC)


def assignment_doc(db: Session, ep: Endpoint) -> dict | None:
    a = db.get(Assignment, ep.id)
    if a is None:
        return None
    layers = assigned_layers(db, a, ep)
    applied = [db.get(Layer, i) for i in a.applied_layers or []]
    return {"state": a.state, "percent": round(a.percent, 1), "detail": a.detail,
            "layers": [f"{r.kind} {r.name}:{r.version}" for r in layers],
            "applied": [f"{r.kind} {r.name}:{r.version}" for r in applied if r is not None],
            "operation": a.operation.get("kind") if a.operation else None,
            "enforce": a.enforce, "downloaded_bytes": a.downloaded_bytes,
            "task": a.task_id, "updated_at": a.updated_at}

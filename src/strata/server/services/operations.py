"""One-off operations on endpoints, carried out by their agents at the next check-in:
revert the system to a snapshot, restore a CVD onto new hardware, provision from
layers, and migrations (to another base or driver layer) tracked as tasks (tasks.py)."""

from __future__ import annotations

import os
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from strata.errors import Conflict, Invalid
from strata.model.admin import (
    MassProvisionRequest,
    MassRevertRequest,
    MigrateRequest,
    ProvisionRequest,
    ProvisionResult,
    RestoreRequest,
    RestoreResult,
    RevertRequest,
    RevertResult,
    TaskInfo,
)
from strata.model.entry import EntryType
from strata.server.catalog.models import Assignment, Endpoint, Layer, SnapshotRecord
from strata.server.context import ServerContext
from strata.server.services import audit, snapshots, tasks, usage
from strata.server.services.assignments import apply_assignment, assignment_of, set_state
from strata.server.services.collections import targets
from strata.server.services.facts import endpoint_family
from strata.server.services.layers import rules_for
from strata.server.services.lookup import find_endpoint


def revert(ctx: ServerContext, ref: str, req: RevertRequest, *, actor: str) -> RevertResult:
    """System layers back to a snapshot; user data stays as it is now."""
    with ctx.write() as db:
        ep = find_endpoint(db, ref)
        rec = snapshots.find_snapshot(db, ep.id, req.snapshot)
        sid = rec.id
        _revert_assignment(db, ep, rec, req.keep_user_apps)
        eid = ep.id
    ctx.invalidate()
    audit.record(ctx, actor, "revert", eid, snapshot=sid, keep_user_apps=req.keep_user_apps)
    return RevertResult(endpoint=eid, snapshot=sid, state="assigned")


def _revert_assignment(db: Session, ep: Endpoint, rec: SnapshotRecord,
                       keep_user_apps: bool) -> None:
    """The endpoint's assignment becomes the layers `rec` was taken with, plus the revert."""
    a = assignment_of(db, ep)
    layers = [db.get(Layer, i) for i in rec.layers or []]
    a.base_id = next((r.id for r in layers if r is not None and r.kind == "base"), None)
    a.app_ids = [r.id for r in layers if r is not None and r.kind == "app"]
    a.operation = {"kind": "revert", "snapshot": rec.id, "keep_user_apps": keep_user_apps}
    set_state(a, "assigned", percent=0.0)


def _task_snapshot(db: Session, ep: Endpoint, which: str) -> SnapshotRecord:
    """The snapshot a mass revert takes an endpoint back to: its latest, or the newest
    its agent took before applying an update."""
    if which == "latest":
        return snapshots.find_snapshot(db, ep.id, "latest")
    cvd = snapshots.cvd_of(db, ep.id)
    rec = db.scalar(select(SnapshotRecord).where(
        SnapshotRecord.cvd_id == (cvd.id if cvd else -1),
        SnapshotRecord.trigger == "pre-update").order_by(SnapshotRecord.time.desc()).limit(1))
    if rec is None:
        raise Conflict(f"endpoint {ep.hostname or ep.id[:8]} has no pre-update snapshot: "
                       "leave it out, or revert it to a snapshot by id")
    return rec


def revert_task(ctx: ServerContext, req: MassRevertRequest, *, actor: str) -> TaskInfo:
    """Revert endpoints (a collection) as one tracked task, each to its own snapshot;
    every endpoint's snapshot is found before anything changes."""
    with ctx.write() as db:
        eps = targets(db, req.endpoints, req.collection, False)
        recs = {ep.id: _task_snapshot(db, ep, req.snapshot) for ep in eps}
        task, previous = tasks.begin(db, "revert", req.model_dump(), eps)
        for ep in eps:
            _revert_assignment(db, ep, recs[ep.id], req.keep_user_apps)
        tasks.enlist(db, task, eps, previous)
        tid = task.id
    ctx.invalidate()
    audit.record(ctx, actor, "revert", f"task {tid}", snapshot=req.snapshot,
                 keep_user_apps=req.keep_user_apps, endpoints=len(eps))
    return tasks.task_info(ctx, tid)


def provision_task(ctx: ServerContext, req: MassProvisionRequest, *,
                   actor: str) -> TaskInfo:
    """Provision endpoints (a collection) from layers as one tracked task."""
    with ctx.write() as db:
        eps = targets(db, req.endpoints, req.collection, False)
        task, previous = tasks.begin(db, "provision", req.model_dump(), eps)
        apply_assignment(db, eps, base=req.base, apps=req.apps, task=task)
        for ep in eps:
            assignment_of(db, ep).operation = {"kind": "provision"}
        tasks.enlist(db, task, eps, previous)
        tid = task.id
    ctx.invalidate()
    audit.record(ctx, actor, "provision", f"task {tid}", base=req.base, apps=req.apps,
                 endpoints=len(eps))
    return tasks.task_info(ctx, tid)


def restore_to(ctx: ServerContext, ref: str, req: RestoreRequest, *,
               actor: str) -> RestoreResult:
    """Full restore of a CVD onto another (new) endpoint: the CVD moves there, identity
    follows it, and the driver layer is chosen again for the new hardware."""
    with ctx.write() as db:
        old, new = find_endpoint(db, ref), find_endpoint(db, req.to_endpoint)
        if old.id == new.id:
            raise Invalid("restore to the same endpoint is a revert")
        sid = snapshots.find_snapshot(db, old.id, "latest").id
        old_a = db.get(Assignment, old.id)
        old_drivers = [db.get(Layer, i) for i in (old_a.applied_layers if old_a else [])]
        removes = _driver_paths(ctx, sid, [d for d in old_drivers
                                           if d is not None and d.kind == "driver"])
        # The CVDs swap contents: the new machine takes the snapshot stream, the old
        # record keeps whatever the new one had centralized before.
        c_old, c_new = snapshots.cvd_of(db, old.id), snapshots.cvd_of(db, new.id)
        assert c_old is not None and c_new is not None
        moving = list(db.scalars(select(SnapshotRecord)
                                 .where(SnapshotRecord.cvd_id == c_old.id)))
        staying = list(db.scalars(select(SnapshotRecord)
                                  .where(SnapshotRecord.cvd_id == c_new.id)))
        moved_at = datetime.now(UTC)
        for r in moving:
            r.cvd_id, r.moved_at = c_new.id, moved_at
        for r in staying:
            r.cvd_id, r.moved_at = c_old.id, moved_at
        c_old.last_snapshot, c_new.last_snapshot = c_new.last_snapshot, c_old.last_snapshot
        a = assignment_of(db, new)
        a.base_id = old_a.base_id if old_a else None
        a.app_ids = list(old_a.app_ids) if old_a else []
        a.driver_ids = None
        a.operation = {"kind": "restore", "snapshot": sid, "removes": removes,
                       "from": old.id, **({"pipelined": True} if req.pipelined else {})}
        set_state(a, "assigned", percent=0.0)
        old.state = "revoked"
        new.hostname = old.hostname
        learned = usage.move(db, old.id, new.id)  # of the CVD's use: the restore reads it
        ids = (old.id, new.id)
        rules = rules_for(ctx, db, endpoint_family(new))
    carried = sum(1 for e in snapshots.entries(ctx, sid)
                  if rules.do_not_download(e.path, e.type is EntryType.DIR))
    ctx.invalidate()
    audit.record(ctx, actor, "restore-to-endpoint", ids[1], source=ids[0], snapshot=sid,
                 own_do_not_download=carried, pipelined=req.pipelined)
    return RestoreResult(**{"from": ids[0]}, to=ids[1], snapshot=sid, state="assigned",
                         own_do_not_download=carried, pipelined=req.pipelined,
                         boot_set=learned[0], working_set=learned[1])


def _driver_paths(ctx: ServerContext, sid: str, drivers: list[Layer]) -> list[str]:
    """What the old hardware's driver layers put in a snapshot: their files, and their
    directories unless something else lives in them."""
    files: set[bytes] = set()
    dirs: set[bytes] = set()
    for d in drivers:
        for e in snapshots.entries(ctx, d.snapshot):
            (dirs if e.type is EntryType.DIR else files).add(e.path)
    shared: set[bytes] = set()
    for e in snapshots.entries(ctx, sid):
        if e.path not in files and e.path not in dirs:
            p = e.path
            while b"/" in p:
                p = p.rpartition(b"/")[0]
                shared.add(p)
    return sorted(os.fsdecode(p) for p in files | (dirs - shared))


def provision(ctx: ServerContext, ref: str, req: ProvisionRequest, *,
              actor: str) -> ProvisionResult:
    """Wipe the endpoint's system and lay down layers; it then starts a fresh CVD."""
    with ctx.write() as db:
        ep = find_endpoint(db, ref)
        apply_assignment(db, [ep], base=req.base, apps=req.apps)
        assignment_of(db, ep).operation = {"kind": "provision"}
        eid = ep.id
    ctx.invalidate()
    audit.record(ctx, actor, "provision", eid, base=req.base, apps=req.apps)
    return ProvisionResult(endpoint=eid, base=req.base, apps=req.apps, state="assigned")


def migrate(ctx: ServerContext, req: MigrateRequest, *, actor: str) -> TaskInfo:
    """Re-base endpoints onto another base (OS migration) or driver layer (hardware
    migration) as one tracked task; each endpoint snapshots itself before the switch."""
    if req.base is None and req.drivers is None:
        raise Invalid("migrate to a --base or --driver layer")
    with ctx.write() as db:
        eps = targets(db, req.endpoints, req.collection, False)
        task, previous = tasks.begin(db, "migrate", req.model_dump(), eps)
        apply_assignment(db, eps, base=req.base, drivers=req.drivers, task=task)
        tasks.enlist(db, task, eps, previous)
        tid = task.id
    ctx.invalidate()
    audit.record(ctx, actor, "migrate", str(tid), base=req.base, drivers=req.drivers,
                 endpoints=len(eps))
    return tasks.task_info(ctx, tid)

"""What IT assigns to each endpoint and where the endpoint stands in getting there: the
layers chosen for it (drivers by hardware unless pinned), the desired state its agent
converges to, assignment to endpoints, a collection or all, and the agent's progress
reports (assigned, downloading, ready, applying, applied, failed)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from strata.errors import Invalid
from strata.layers.image import KIND_ORDER
from strata.model.admin import AssignmentStatus, AssignRequest, AssignResult
from strata.model.update import UpdateState
from strata.model.wire import DesiredLayer, DesiredState
from strata.server.catalog.models import Assignment, Endpoint, Layer, Task
from strata.server.context import ServerContext
from strata.server.services import audit, snapshots
from strata.server.services.collections import targets
from strata.server.services.facts import endpoint_facts, endpoint_family, rule_matches
from strata.server.services.layers import label, rules_doc
from strata.server.services.lookup import find_layer

# -- choosing layers --------------------------------------------------------------------------


def drivers_for(db: Session, ep: Endpoint) -> list[Layer]:
    """The driver layers whose rules match the endpoint's hardware: the newest version
    of each name."""
    facts = endpoint_facts(ep)
    chosen: dict[str, Layer] = {}
    for layer in db.scalars(select(Layer).where(Layer.kind == "driver")
                            .order_by(Layer.created_at, Layer.id)):
        rule = layer.match or {}
        if rule and rule_matches(rule, facts):
            chosen[layer.name] = layer  # later rows are newer versions
    return list(chosen.values())


def assigned_layers(db: Session, a: Assignment, ep: Endpoint) -> list[Layer]:
    """The endpoint's IT layers in merge order: base, drivers, apps."""
    rows: list[Layer | None] = []
    if a.base_id is not None:
        rows.append(db.get(Layer, a.base_id))
    if a.driver_ids is not None:
        rows += [db.get(Layer, i) for i in a.driver_ids]
    else:
        rows += drivers_for(db, ep)
    rows += [db.get(Layer, i) for i in a.app_ids]
    return sorted([r for r in rows if r is not None], key=lambda r: KIND_ORDER[r.kind])


def assignment_of(db: Session, ep: Endpoint) -> Assignment:
    """The endpoint's assignment row, created empty on first use."""
    a = db.get(Assignment, ep.id)
    if a is None:
        a = Assignment(endpoint_id=ep.id, app_ids=[], applied_layers=[], operation={})
        db.add(a)
    return a


def set_state(a: Assignment, state: str, *, percent: float | None = None,
              detail: str = "") -> None:
    a.state = state
    if state == "assigned":  # a new desired state: nothing of it is downloaded yet
        a.downloaded_bytes = 0
    if percent is not None:
        a.percent = percent
    a.detail = detail
    a.updated_at = datetime.now(UTC)


def assignment_status(db: Session, ep: Endpoint) -> AssignmentStatus | None:
    a = db.get(Assignment, ep.id)
    if a is None:
        return None
    applied = [db.get(Layer, i) for i in a.applied_layers or []]
    return AssignmentStatus(
        state=a.state, percent=round(a.percent, 1), detail=a.detail,
        layers=[label(r) for r in assigned_layers(db, a, ep)],
        applied=[label(r) for r in applied if r is not None],
        operation=a.operation.get("kind") if a.operation else None, enforce=a.enforce,
        downloaded_bytes=a.downloaded_bytes, task=a.task_id, updated_at=a.updated_at)


# -- the desired state --------------------------------------------------------------------------


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
                        pipelined=bool(op.get("pipelined")), enforce=a.enforce,
                        family=family, rules=rules_doc(ctx, db, family))


def cached_desired(ctx: ServerContext, ep: Endpoint) -> DesiredState | None:
    def load() -> tuple[DesiredState | None]:
        with ctx.session() as db:
            return (desired_state(ctx, db, ep),)
    return ctx.cached(desired_key(ep.id), load)[0]


def desired_key(endpoint_id: str) -> str:
    """The cache key of the endpoint's desired state (a credential lookup fills it for an
    endpoint without an assignment: None, in a 1-tuple since a bare None is not kept)."""
    return f"desired:{endpoint_id}"


def mark_applied(ctx: ServerContext, endpoint_id: str, desired: DesiredState) -> bool:
    """The endpoint already has its desired state (e.g. a migration to the layers it runs):
    record it as applied without an update."""
    with ctx.write() as db:
        a = db.get(Assignment, endpoint_id)
        if a is not None and a.state != "applied":
            set_state(a, "applied", percent=100.0)
            a.applied_key = desired.key
    return True


# -- assigning ----------------------------------------------------------------------------------


def apply_assignment(db: Session, eps: list[Endpoint], *, base: str | None = None,
                     apps: list[str] | None = None, drivers: list[str] | None = None,
                     enforce: bool | None = None, task: Task | None = None) -> list[str]:
    """Set the named layers (None: leave as is) on each endpoint's assignment; every
    layer is resolved, and its kind checked, before anything changes."""
    base_row = find_layer(db, base, "base") if base else None
    app_rows = [find_layer(db, r, "app") for r in apps] if apps is not None else None
    driver_rows = [find_layer(db, r, "driver") for r in drivers] \
        if drivers is not None else None
    for ep in eps:
        a = assignment_of(db, ep)
        if base_row is not None:
            a.base_id = base_row.id
        if app_rows is not None:
            a.app_ids = [r.id for r in app_rows]
        if driver_rows is not None:
            a.driver_ids = [r.id for r in driver_rows] or None
        if enforce is not None:
            a.enforce = enforce
        if task is not None:
            a.task_id = task.id
        set_state(a, "assigned", percent=0.0)
    return [ep.id for ep in eps]


def assign(ctx: ServerContext, req: AssignRequest, *, actor: str) -> AssignResult:
    """Assign layers to endpoints, a collection or all, as a tracked task; agents learn it
    at check-in."""
    if req.base is None and req.apps is None and req.drivers is None \
            and req.enforce is None:
        raise Invalid("nothing to assign: give a base, apps, drivers or enforce")
    from strata.server.services import tasks  # it builds on this module

    with ctx.write() as db:
        eps = targets(db, req.endpoints, req.collection, req.all)
        task, previous = tasks.begin(db, "assign", req.model_dump(), eps)
        done = apply_assignment(db, eps, base=req.base, apps=req.apps, drivers=req.drivers,
                                enforce=req.enforce, task=task)
        tasks.enlist(db, task, eps, previous)
        tid = task.id
    ctx.invalidate()
    audit.record(ctx, actor, "assign",
                 req.collection or ("all" if req.all else ",".join(done)), base=req.base,
                 apps=req.apps, drivers=req.drivers, enforce=req.enforce, endpoints=len(done))
    return AssignResult(endpoints=done, base=req.base, apps=req.apps, task=tid)


# -- the agent's progress -----------------------------------------------------------------------


def report_progress(ctx: ServerContext, ep: Endpoint, *, key: str, state: UpdateState,
                    percent: float, detail: str, downloaded_bytes: int,
                    refused: bool = False) -> bool:
    """Record the agent's progress on its desired state; False (ignored) when `key` is
    not the current desired state's. A refusal (unsigned, forged or stale layers, see
    docs/security.md) is audited as such."""
    desired = cached_desired(ctx, ep)
    if desired is None or desired.key != key:
        return False
    with ctx.write() as db:
        a = db.get(Assignment, ep.id)
        assert a is not None
        set_state(a, state, percent=percent, detail=detail)
        a.desired_key = key
        a.downloaded_bytes = downloaded_bytes
        if state is UpdateState.APPLIED:
            _applied(db, a, desired, ep)
    if state in (UpdateState.APPLIED, UpdateState.FAILED):
        ctx.invalidate()
        action = "layer-refused" if refused else f"update-{state}"
        audit.record(ctx, f"endpoint:{ep.id}", action, key, detail=detail[:500],
                     operation=desired.operation)
    return True


def _applied(db: Session, a: Assignment, desired: DesiredState, ep: Endpoint) -> None:
    owned = desired.owned if desired.owned is not None else desired.layers
    a.applied_key = desired.key
    a.applied_layers = [dl.id for dl in owned if dl.id is not None]
    a.percent = 100.0
    if a.operation.get("kind") == "provision":
        # A provisioned endpoint starts a fresh CVD: its next snapshot has no parent.
        cvd = snapshots.cvd_of(db, ep.id)
        if cvd is not None:
            cvd.last_snapshot = None
    a.operation = {}  # a one-off operation is done; the layers stay assigned
    a.updated_at = datetime.now(UTC)

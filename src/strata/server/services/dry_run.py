"""The dry run of an update: what it would change on an endpoint (against its latest
snapshot) and every conflict, before anything is assigned. Each figure is one step
below, so a new kind of check adds one step and one field of `DryRunReport`."""

from __future__ import annotations

import time
from dataclasses import dataclass

from strata.errors import Conflict
from strata.layers.config_merge import StoreInputs, resolve_merges
from strata.layers.image import Image, build_image
from strata.layers.plan import Plan, plan_update
from strata.layers.rules import LayerRules
from strata.model.admin import DryRunReport, DryRunRequest, PlanConflict
from strata.model.entry import Entry
from strata.server.catalog.models import Assignment, Endpoint, Layer, SnapshotRecord
from strata.server.context import ServerContext
from strata.server.services import snapshots
from strata.server.services.assignments import assigned_layers
from strata.server.services.facts import endpoint_family
from strata.server.services.layers import image_of, label, layer_content, rules_for
from strata.server.services.lookup import find_endpoint, find_layer

MAX_CONFLICTS = 500  # listed one by one; all are counted


@dataclass
class UpdateCase:
    """Everything a dry run looks at, read from the catalog and the store."""

    endpoint: Endpoint
    snapshot: SnapshotRecord
    layers: list[Layer]  # the layers after the update, in merge order
    rules: LayerRules
    owned: Image  # what the layers applied now laid down
    free_bytes: int | float | None  # the smallest free space the agent reported


def dry_run(ctx: ServerContext, req: DryRunRequest) -> DryRunReport:
    case = _read_case(ctx, req)
    image = build_image([layer_content(ctx, r) for r in case.layers], case.rules)
    entries = list(snapshots.entries(ctx, case.snapshot.id))
    plan = plan_update(entries, image, case.rules, owned=case.owned.entries)
    # Account databases merged as the agent will (clashes show as account-clash and hold).
    resolve_merges(plan, StoreInputs(ctx.store.load_chunk), case.rules.family, time.time_ns())
    report = _report(case, plan, entries)
    _check_disk_space(report, case.free_bytes)
    return report


def _read_case(ctx: ServerContext, req: DryRunRequest) -> UpdateCase:
    with ctx.session() as db:
        ep = find_endpoint(db, req.endpoint)
        snap = snapshots.head_snapshot(db, ep.id)
        if snap is None:
            raise Conflict(f"endpoint {ep.id[:8]} has not centralized yet")
        a = db.get(Assignment, ep.id) or Assignment(endpoint_id=ep.id, app_ids=[],
                                                    applied_layers=[])
        current = assigned_layers(db, a, ep)
        base = find_layer(db, req.base, "base") if req.base else \
            next((r for r in current if r.kind == "base"), None)
        apps = [find_layer(db, r, "app") for r in req.apps] if req.apps is not None \
            else [r for r in current if r.kind == "app"]
        drivers = [r for r in current if r.kind == "driver"]
        family = endpoint_family(ep)
        disks = (ep.inventory or {}).get("disks", [])
        return UpdateCase(
            endpoint=ep, snapshot=snap,
            layers=[r for r in (base, *drivers, *apps) if r is not None],
            rules=rules_for(ctx, db, family),
            owned=image_of(ctx, db, list(a.applied_layers or []), family),
            free_bytes=min((d.get("free_bytes", 0) for d in disks), default=None))


def _report(case: UpdateCase, plan: Plan, entries: list[Entry]) -> DryRunReport:
    have = {c for e in entries for c, _ in e.chunks}
    summary = plan.summary(limit=MAX_CONFLICTS)
    return DryRunReport(
        **summary, endpoint=case.endpoint.id, snapshot=case.snapshot.id,
        layers=[label(r) for r in case.layers],
        chunks_to_download=len(plan.chunk_ids() - have), free_bytes=case.free_bytes)


def _check_disk_space(report: DryRunReport, free: int | float | None) -> None:
    if free is not None and report.bytes_to_write > free:
        report.conflict_list.insert(0, PlanConflict(
            kind="disk-space", path="/", detail=f"needs {report.bytes_to_write} bytes, "
                                                 f"{free} free"))
        report.conflicts["disk-space"] = 1

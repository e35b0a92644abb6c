"""Compliance: how far each endpoint has drifted from the IT layers applied on it, with
scores per endpoint and per layer: as its agent last measured its live tree, or as its
latest snapshot shows, whichever is newer."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from strata.layers.compliance import check_compliance
from strata.model.admin import ComplianceReport, ComplianceUnavailable, EndpointCompliance
from strata.server.catalog.models import Assignment, Endpoint
from strata.server.context import ServerContext
from strata.server.services import snapshots
from strata.server.services.facts import endpoint_family
from strata.server.services.layers import image_of, rules_for
from strata.server.services.live_compliance import live_compliance
from strata.server.services.lookup import find_endpoint


def endpoint_compliance(ctx: ServerContext, db: Session, ep: Endpoint
                        ) -> EndpointCompliance | ComplianceUnavailable:
    a = db.get(Assignment, ep.id)
    snap = snapshots.head_snapshot(db, ep.id)
    if a is None or not a.applied_layers:
        return ComplianceUnavailable(endpoint=ep.id, hostname=ep.hostname,
                                     state="no layers applied")
    if snap is None:
        return ComplianceUnavailable(endpoint=ep.id, hostname=ep.hostname,
                                     state="not centralized")
    live = live_compliance(db, ep, a, snap)
    if live is not None:
        return live
    family = endpoint_family(ep)
    image = image_of(ctx, db, list(a.applied_layers), family)
    report = check_compliance(snapshots.entries(ctx, snap.id), image,
                              rules_for(ctx, db, family))
    return EndpointCompliance(endpoint=ep.id, hostname=ep.hostname, snapshot=snap.id,
                              snapshot_time=snap.time, enforce=a.enforce,
                              measured_at=snap.time, **report.to_dict())


def compliance_report(ctx: ServerContext, endpoint: str | None = None) -> ComplianceReport:
    """One endpoint's report (with its drifted paths), or every active endpoint's."""
    with ctx.session() as db:
        eps = [find_endpoint(db, endpoint)] if endpoint else list(db.scalars(
            select(Endpoint).where(Endpoint.state == "active").order_by(Endpoint.enrolled_at)))
        reports = [endpoint_compliance(ctx, db, ep) for ep in eps]
    per_layer: dict[str, list[float]] = {}
    for r in reports:
        if isinstance(r, EndpointCompliance):
            for name, figures in r.layers.items():
                per_layer.setdefault(name, []).append(figures.score)
    return ComplianceReport(endpoints=reports,
                            layers={k: round(sum(v) / len(v), 2) for k, v in per_layer.items()})

"""Compliance the agents measure on their live trees: each report is kept (one per
endpoint, the latest) while it is about the layers applied on the endpoint now, and
read back as that endpoint's compliance when it is newer than its latest snapshot."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.orm import Session

from strata.model.admin import DriftCounts, EndpointCompliance, LayerFigures
from strata.model.wire import LiveComplianceReport
from strata.server.catalog.models import Assignment, Endpoint, LiveCompliance, SnapshotRecord
from strata.server.context import ServerContext


def record(ctx: ServerContext, ep: Endpoint, report: LiveComplianceReport) -> bool:
    """Keep `report` as the endpoint's live compliance; False (ignored) when it was
    measured against layers that are no longer the applied ones."""
    with ctx.write() as db:
        a = db.get(Assignment, ep.id)
        if a is None or not a.applied_key or a.applied_key != report.key:
            return False
        row = db.get(LiveCompliance, ep.id)
        doc, now = report.model_dump(mode="json"), datetime.now(UTC)
        if row is None:
            db.add(LiveCompliance(endpoint_id=ep.id, applied_key=report.key,
                                  measured_at=now, report=doc))
        else:
            row.applied_key, row.measured_at, row.report = report.key, now, doc
    return True


def _score(managed: int, drift: int) -> float:
    return round(100.0 * (managed - drift) / managed, 2) if managed else 100.0


def live_compliance(db: Session, ep: Endpoint, a: Assignment,
                    snap: SnapshotRecord) -> EndpointCompliance | None:
    """The endpoint's live report, if it is about its applied layers and newer than its
    latest snapshot `snap` (else the snapshot says more)."""
    row = db.get(LiveCompliance, ep.id)
    if row is None or row.applied_key != a.applied_key or row.measured_at < snap.time:
        return None
    r = LiveComplianceReport.model_validate(row.report)
    c = r.counts
    drift = c.changed + c.missing + c.added
    return EndpointCompliance(
        endpoint=ep.id, hostname=ep.hostname, snapshot=snap.id, snapshot_time=snap.time,
        enforce=a.enforce, score=_score(r.managed + c.added, drift), managed=r.managed,
        drift=drift, changed=r.changed, missing=r.missing, added=r.added,
        counts=DriftCounts(changed=c.changed, missing=c.missing, added=c.added),
        layers={name: LayerFigures(managed=f.managed, drift=f.drift,
                                   score=_score(f.managed, f.drift))
                for name, f in r.layers.items()},
        source="live", measured_at=row.measured_at)

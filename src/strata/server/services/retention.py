"""What a retention policy removes from each CVD: the one plan that maintenance carries
out and that `policy set retention` shows (per endpoint, revert points apart) before
anyone confirms a change. Revert points younger than the policy's `revert_points_days`
are always kept."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from strata.engine.retention import SnapshotInfo, apply_policy
from strata.server.catalog.models import Cvd, Endpoint, SnapshotRecord
from strata.server.policies import REVERT_POINT_TRIGGERS, retention_policy, revert_point_days


@dataclass
class CvdRetention:
    endpoint_id: str
    hostname: str
    snapshots: int
    removed: list[str] = field(default_factory=list)  # snapshot ids retention forgets
    revert_points_removed: int = 0  # pre-update snapshots among them


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def plan_retention(db: Session, document: dict, now: datetime | None = None
                   ) -> list[CvdRetention]:
    """Every CVD's snapshots that `document` (a retention policy) would remove now."""
    policy = retention_policy(document)
    protect_after = (now or datetime.now(UTC)) - timedelta(days=revert_point_days(document))
    out: list[CvdRetention] = []
    rows = db.execute(select(Cvd.id, Endpoint.id, Endpoint.hostname)
                      .join(Endpoint, Endpoint.id == Cvd.endpoint_id)
                      .order_by(Endpoint.id)).all()
    for cvd_id, endpoint_id, hostname in rows:
        snaps = {r.id: r for r in db.scalars(select(SnapshotRecord)
                                               .where(SnapshotRecord.cvd_id == cvd_id))}
        infos = [SnapshotInfo(id=r.id, time=_aware(r.time), host=endpoint_id,
                              tags=tuple(r.tags or ())) for r in snaps.values()]
        plan = CvdRetention(endpoint_id, hostname, len(snaps))
        for decision in apply_policy(infos, policy) if infos else []:
            rec = snaps[decision.snapshot.id]
            if decision.keep:
                continue
            if rec.trigger in REVERT_POINT_TRIGGERS:
                if _aware(rec.time) >= protect_after:
                    continue  # a recent way back from an update
                plan.revert_points_removed += 1
            plan.removed.append(rec.id)
        out.append(plan)
    return out

"""What a retention policy removes from each CVD: the one plan that maintenance carries
out and that `policy set retention` shows (per endpoint, revert points apart) before
anyone confirms a change. The decisions are the engine's (engine/retention.py); this
says which snapshots are protected from when: a revert point from when it was taken,
history a restore moved onto new hardware from when it moved (`protect_days`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from strata.engine.retention import SnapshotInfo, apply_policy
from strata.server.catalog.models import Cvd, Endpoint, SnapshotRecord
from strata.server.policies import REVERT_POINT_TRIGGERS, retention_policy


@dataclass
class CvdRetention:
    endpoint_id: str
    hostname: str
    snapshots: int
    removed: list[str] = field(default_factory=list)  # snapshot ids retention forgets
    revert_points_removed: int = 0  # pre-update snapshots among them


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _info(rec: SnapshotRecord, endpoint_id: str) -> SnapshotInfo:
    since: datetime | None = None
    label = "protected snapshot"
    if rec.moved_at is not None:
        since, label = _aware(rec.moved_at), "history moved by a restore"
    if rec.trigger in REVERT_POINT_TRIGGERS:
        taken = _aware(rec.time)
        since = max(since or taken, taken)  # the later start protects longer
        label = "pre-update revert point"
    return SnapshotInfo(id=rec.id, time=_aware(rec.time), host=endpoint_id,
                        tags=tuple(rec.tags or ()), protected_since=since, protected_as=label)


def plan_retention(db: Session, document: dict, now: datetime | None = None
                   ) -> list[CvdRetention]:
    """Every CVD's snapshots that `document` (a retention policy) would remove now."""
    policy = retention_policy(document)
    now = now or datetime.now(UTC)
    out: list[CvdRetention] = []
    rows = db.execute(select(Cvd.id, Endpoint.id, Endpoint.hostname)
                      .join(Endpoint, Endpoint.id == Cvd.endpoint_id)
                      .order_by(Endpoint.id)).all()
    for cvd_id, endpoint_id, hostname in rows:
        snaps = {r.id: r for r in db.scalars(select(SnapshotRecord)
                                               .where(SnapshotRecord.cvd_id == cvd_id))}
        infos = [_info(r, endpoint_id) for r in snaps.values()]
        plan = CvdRetention(endpoint_id, hostname, len(snaps))
        for decision in apply_policy(infos, policy, now=now) if infos else []:
            rec = snaps[decision.snapshot.id]
            if decision.keep:
                continue
            if rec.trigger in REVERT_POINT_TRIGGERS:
                plan.revert_points_removed += 1
            plan.removed.append(rec.id)
        out.append(plan)
    return out

"""Each endpoint's learned boot set and working set (model/usage.py): stored as the agent
sends them (already validated and bounded by the wire model), handed back only to that
endpoint, and moved with the CVD when it is restored onto new hardware."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import delete
from sqlalchemy.orm import Session

from strata.model.usage import UsageSets
from strata.server.catalog.models import Endpoint, UsageSet
from strata.server.context import ServerContext
from strata.server.services.lookup import find_endpoint


def store(ctx: ServerContext, ep: Endpoint, sets: UsageSets) -> dict[str, object]:
    with ctx.write() as db:
        row = db.get(UsageSet, ep.id)
        if row is None:
            row = UsageSet(endpoint_id=ep.id)
            db.add(row)
        row.boot, row.working = list(sets.boot), list(sets.working)
        row.boots_seen, row.learned_at = sets.boots_seen, sets.learned_at
        row.updated_at = datetime.now(UTC)
    return {"stored": True, **sets.summary()}


def _sets(row: UsageSet | None) -> UsageSets:
    if row is None:
        return UsageSets()
    return UsageSets(boot=row.boot, working=row.working, boots_seen=row.boots_seen,
                     learned_at=row.learned_at)


def of_endpoint(ctx: ServerContext, endpoint_id: str) -> UsageSets:
    with ctx.session() as db:
        return _sets(db.get(UsageSet, endpoint_id))


def summary(ctx: ServerContext, ref: str) -> dict[str, object]:
    """How much was learned (counts and when), for IT: not the paths themselves."""
    with ctx.session() as db:
        ep = find_endpoint(db, ref)
        return {"endpoint": ep.id, **_sets(db.get(UsageSet, ep.id)).summary()}


def move(db: Session, old_id: str, new_id: str) -> tuple[int, int]:
    """The CVD moves to new hardware (operations.restore_to): what was learned of its use
    goes with it, replacing whatever the new machine learned of its fresh install.
    Returns the sizes of the boot set and the working set moved."""
    old = db.get(UsageSet, old_id)
    db.execute(delete(UsageSet).where(UsageSet.endpoint_id == new_id))
    if old is None:
        return 0, 0
    db.add(UsageSet(endpoint_id=new_id, boot=list(old.boot), working=list(old.working),
                    boots_seen=old.boots_seen, learned_at=old.learned_at))
    db.delete(old)
    db.flush()
    return len(old.boot), len(old.working)


def forget(db: Session, endpoint_id: str) -> None:
    db.execute(delete(UsageSet).where(UsageSet.endpoint_id == endpoint_id))

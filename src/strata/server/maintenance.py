"""Scheduled upkeep: apply the retention policy to every CVD, then prune the store.

Runs in a background thread of the server. Prune is safe against uploads in flight:
each upload holds a store session, and commits re-check their chunks (see docs/safety.md).
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC

from sqlalchemy import delete, select

from strata.engine.prune import prune
from strata.engine.retention import SnapshotInfo, apply_policy
from strata.errors import StrataError
from strata.server.catalog.models import Cvd, SnapshotRecord
from strata.server.context import SEEN_FLUSH_SECONDS, ServerContext
from strata.server.deps import audit
from strata.server.policies import get_policy, retention_policy

log = logging.getLogger("strata.server")


def run_maintenance(ctx: ServerContext) -> dict:
    """One pass: forget what the retention policy does not keep, then prune."""
    ctx.expire_uploads()
    with ctx.write() as db:
        policy = retention_policy(get_policy(db, "retention"))
        removed: list[str] = []
        for cvd in db.scalars(select(Cvd)):
            rows = list(db.scalars(select(SnapshotRecord)
                                   .where(SnapshotRecord.cvd_id == cvd.id)))
            # SQLite hands datetimes back naive; they were stored as UTC.
            infos = [SnapshotInfo(id=r.id, time=r.time if r.time.tzinfo
                                  else r.time.replace(tzinfo=UTC), host=cvd.endpoint_id,
                                  tags=tuple(r.tags or ())) for r in rows]
            gone = [d.snapshot.id for d in apply_policy(infos, policy) if not d.keep]
            for sid in gone:
                ctx.store.remove_snapshot(sid)
            if gone:
                db.execute(delete(SnapshotRecord).where(SnapshotRecord.id.in_(gone)))
            removed += gone
        db.commit()
    try:
        result = prune(ctx.store).to_dict()
    except StrataError as exc:  # e.g. another prune is running: try next time
        result = {"error": str(exc)}
    summary = {"snapshots_removed": len(removed), "prune": result}
    audit(ctx, "server", "maintenance", "", **summary)
    return summary


class SeenFlusher(threading.Thread):
    """Writes endpoints' last-seen times in batches, off the request path."""

    def __init__(self, ctx: ServerContext):
        super().__init__(name="seen-flusher", daemon=True)
        self.ctx = ctx
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(SEEN_FLUSH_SECONDS):
            try:
                self.ctx.flush_seen()
            except Exception:  # a busy catalog must not end the thread
                log.exception("writing last-seen times failed")
        self.ctx.flush_seen()


class MaintenanceThread(threading.Thread):
    def __init__(self, ctx: ServerContext):
        super().__init__(name="maintenance", daemon=True)
        self.ctx = ctx
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.ctx.settings.maintenance_interval):
            try:
                run_maintenance(self.ctx)
            except Exception:  # keep the server serving whatever upkeep hits
                log.exception("maintenance failed")

"""Scheduled upkeep: apply the retention policy to every CVD, then prune the store.

Runs in a background thread of the server. Prune is safe against uploads in flight:
each upload holds a store session, and commits re-check their chunks (see docs/safety.md).
With several server processes, one at a time runs it: each pass takes the store's
"maintenance" lock (a PostgreSQL advisory lock with a PostgreSQL catalog, a file lock
otherwise) without waiting, and a process that finds it taken skips its turn.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import delete

from strata.engine.prune import prune
from strata.errors import Conflict, StoreLocked, StrataError
from strata.server.catalog.models import SnapshotRecord
from strata.server.context import SEEN_FLUSH_SECONDS, ServerContext
from strata.server.policies import get_policy
from strata.server.services import audit
from strata.server.services.retention import plan_retention

log = logging.getLogger("strata.server")
AUDITED_ENDPOINTS = 200  # named one by one in a maintenance's audit record; all are counted


def run_maintenance(ctx: ServerContext, actor: str = "server") -> dict:
    """One pass: forget what the retention policy does not keep (recent revert points
    excepted: services/retention.py), then prune. `actor`: who asked (the schedule is
    "server"; a protection manager may run one at once). `Conflict` if another server
    process is running one."""
    ctx.expire_uploads()  # this process's own upload sessions, whoever maintains
    try:
        with ctx.store.coordination.exclusive("maintenance", what="maintenance"):
            return _maintain(ctx, actor)
    except StoreLocked:
        raise Conflict("maintenance is running in another server process; "
                       "try again later") from None


def scheduled_maintenance(ctx: ServerContext) -> None:
    """The schedule's pass: skipped, not an error, while another process runs one."""
    try:
        run_maintenance(ctx)
    except Conflict:
        log.info("maintenance skipped: another server process is running it")


def _maintain(ctx: ServerContext, actor: str) -> dict:
    with ctx.write() as db:
        removed: list[str] = []
        per_endpoint: dict[str, int] = {}  # what the audit log says was forgotten, and where
        for cvd in plan_retention(db, get_policy(db, "retention")):
            for sid in cvd.removed:
                ctx.store.remove_snapshot(sid)
            if cvd.removed:
                db.execute(delete(SnapshotRecord).where(SnapshotRecord.id.in_(cvd.removed)))
                per_endpoint[cvd.endpoint_id] = len(cvd.removed)
            removed += cvd.removed
        db.commit()
    if removed:
        log.info("retention forgot %d snapshots of %d endpoints", len(removed),
                 len(per_endpoint))
    try:
        result = prune(ctx.store).to_dict()
        result["holdings_forgotten"] = ctx.holdings.sweep(ctx.store.present)
    except StrataError as exc:  # e.g. another prune is running: try next time
        result = {"error": str(exc)}
    shown = dict(sorted(per_endpoint.items())[:AUDITED_ENDPOINTS])
    summary = {"snapshots_removed": len(removed), "prune": result,
               "removed_per_endpoint": shown}
    audit.record(ctx, actor, "maintenance", "", **summary)
    return summary


class PeriodicThread(threading.Thread):
    """Runs `work` every `interval` seconds until stopped; an error is logged and the
    next round still runs, so upkeep never takes the server down."""

    def __init__(self, name: str, interval: float, work: Callable[[], object],
                 *, on_stop: Callable[[], object] | None = None):
        super().__init__(name=name, daemon=True)
        self.interval, self.work, self.on_stop = interval, work, on_stop
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.work()
            except Exception:
                log.exception("%s failed", self.name)
        if self.on_stop:
            self.on_stop()


def upkeep_threads(ctx: ServerContext) -> list[PeriodicThread]:
    """Retention + prune on the configured interval; last-seen times in batches."""
    return [PeriodicThread("maintenance", ctx.settings.maintenance_interval,
                           lambda: scheduled_maintenance(ctx)),
            PeriodicThread("seen-flusher", SEEN_FLUSH_SECONDS, ctx.flush_seen,
                           on_stop=ctx.flush_seen)]

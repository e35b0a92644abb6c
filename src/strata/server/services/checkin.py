"""An agent's check-in: note what changed in its inventory, and answer with its policy,
the store's chunker, its CVD's head and its desired state. Nearly every check-in is
answered from caches alone."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from strata.model.wire import CheckinRequest, CheckinResponse, ChunkerSpec
from strata.server import metrics
from strata.server.catalog.models import Endpoint
from strata.server.context import ServerContext
from strata.server.services import snapshots
from strata.server.services.assignments import cached_desired, mark_applied
from strata.server.services.policies import agent_policy


def checkin(ctx: ServerContext, ep: Endpoint, req: CheckinRequest, ip: str) -> CheckinResponse:
    now = datetime.now(UTC)
    metrics.CHECKINS.inc()
    if req.inventory and req.inventory != ep.inventory:  # most check-ins change nothing
        _update_inventory(ctx, ep, req.inventory)
    with ctx.session() as db:
        policy = agent_policy(ctx, db, ep, now, ip=ip, site=req.site, subnet=req.subnet,
                              utc_offset_minutes=req.utc_offset_minutes)
    last_id, last_time = snapshots.cached_head(ctx, ep.id)
    desired = cached_desired(ctx, ep)
    applied = req.status.get("applied_key")
    if desired is not None and applied == desired.key:
        ctx.cached(f"applied:{ep.id}:{applied}", lambda: mark_applied(ctx, ep.id, desired))
    cfg = ctx.store.config
    return CheckinResponse(
        endpoint_id=ep.id, state=ep.state, policy=policy,
        chunker=ChunkerSpec(min_size=cfg.chunker.min_size, avg_size=cfg.chunker.avg_size,
                            max_size=cfg.chunker.max_size, zstd_level=cfg.zstd_level or 3),
        last_snapshot=last_id, last_snapshot_time=last_time, server_time=now,
        desired=desired)


def _update_inventory(ctx: ServerContext, ep: Endpoint, inventory: dict[str, Any]) -> None:
    with ctx.write() as db:
        row = db.get(Endpoint, ep.id)
        assert row is not None
        row.inventory = inventory
        row.hostname = str(inventory.get("hostname", row.hostname))
        row.os = str(inventory.get("os", row.os))
        ep.inventory, ep.hostname, ep.os = row.inventory, row.hostname, row.os
    ctx.invalidate()  # drivers follow the hardware: the desired state is recomputed

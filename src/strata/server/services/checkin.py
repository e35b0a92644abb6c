"""An agent's check-in: note what changed in its inventory, and answer with its policy,
the store's chunker, its CVD's head and its desired state. Nearly every check-in is
answered from caches alone."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from strata.errors import Invalid
from strata.model.wire import CheckinRequest, CheckinResponse, ChunkerSpec
from strata.server import metrics
from strata.server.catalog.models import Endpoint
from strata.server.catalog.types import CatalogValueError, check_json
from strata.server.context import ServerContext
from strata.server.read_cache import NeedsLoad, may_load
from strata.server.services import reflectors, snapshots
from strata.server.services.assignments import cached_desired, mark_applied
from strata.server.services.facts import endpoint_facts, endpoint_family
from strata.server.services.policies import agent_policy


def checkin(ctx: ServerContext, ep: Endpoint, req: CheckinRequest, ip: str) -> CheckinResponse:
    """The answer to a check-in. Runs first on the event loop with cached values only
    (read_cache.hits_only) and, when one is missing, again in a worker thread: until the
    first NeedsLoad it does only what may be done twice."""
    now = datetime.now(UTC)
    if req.inventory and req.inventory != ep.inventory:  # most check-ins change nothing
        _update_inventory(ctx, ep, req.inventory)
    policy = agent_policy(ctx, None, ep, now, ip=ip, site=req.site, subnet=req.subnet,
                          utc_offset_minutes=req.utc_offset_minutes)
    last_id, last_time = snapshots.cached_head(ctx, ep.id)
    desired = cached_desired(ctx, ep)
    applied = req.status.get("applied_key")
    if desired is not None and applied == desired.key:
        ctx.cached(f"applied:{ep.id}:{applied}", lambda: mark_applied(ctx, ep.id, desired))
    cfg = ctx.store.config
    route = reflectors.route_for(
        ctx, ep, site=req.site or str((ep.inventory or {}).get("site", "")),
        addresses=[a for a in (req.subnet, ip or ep.last_ip) if a], desired=desired)
    metrics.CHECKINS.inc()
    return CheckinResponse(
        endpoint_id=ep.id, state=ep.state, policy=policy,
        chunker=ChunkerSpec(min_size=cfg.chunker.min_size, avg_size=cfg.chunker.avg_size,
                            max_size=cfg.chunker.max_size, zstd_level=cfg.zstd_level or 3),
        last_snapshot=last_id, last_snapshot_time=last_time, server_time=now,
        desired=desired, reflector=route)


def _update_inventory(ctx: ServerContext, ep: Endpoint, inventory: dict[str, Any]) -> None:
    try:
        check_json(inventory)  # before it waits in a batch, which it must not fail
    except CatalogValueError as exc:
        raise Invalid(f"refused: {exc}") from None
    new = Endpoint(inventory=inventory, hostname=str(inventory.get("hostname", ep.hostname)),
                   os=str(inventory.get("os", ep.os)))
    if _rule_facts(new) == _rule_facts(ep):
        # Figures such as free disk space, in nearly every check-in of a real agent:
        # written with the next batch of visits, and no cache cleared (clearing made each
        # check-in of the fleet reload its credential, policy and state from the catalog).
        # Safe to repeat: a check-in run again in a thread finds nothing changed.
        ctx.note_inventory(ep.id, inventory)
        ep.inventory = inventory  # the cached record: what the next check-in compares with
        return
    if not may_load():
        raise NeedsLoad("inventory")  # a write: in a worker thread, not on the event loop
    with ctx.write() as db:
        ctx.forget_inventory(ep.id)  # older than this one
        row = db.get(Endpoint, ep.id)
        assert row is not None
        row.inventory, row.hostname, row.os = inventory, new.hostname, new.os
    ep.inventory, ep.hostname, ep.os = inventory, new.hostname, new.os
    # Drivers and collections follow the hardware, the OS and the name: the desired state
    # is recomputed.
    ctx.invalidate()


def _rule_facts(ep: Endpoint) -> tuple[dict[str, str], str]:
    """What layer and collection rules see of an endpoint's inventory."""
    return endpoint_facts(ep), endpoint_family(ep)

"""The fleet at a glance, for the console: endpoints by state, the most recently seen,
search over the endpoint list. A few aggregate queries, whatever the fleet's size (the
admin API's per-endpoint detail costs several queries per endpoint)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_, select

from strata.model.admin import StoreFigures
from strata.server.catalog.models import Cvd, Endpoint, SnapshotRecord
from strata.server.context import ServerContext
from strata.server.services.storage import storage_figures

SEARCH_ROWS = 200  # one page of search results
RECENT = 10
STORAGE_CACHE_SECONDS = 60.0  # the figures read every snapshot: not on each page load


@dataclass(frozen=True)
class EndpointRow:
    id: str
    hostname: str
    os: str
    state: str
    last_seen: datetime | None
    last_ip: str
    snapshots: int


@dataclass(frozen=True)
class FleetOverview:
    total: int
    by_state: dict[str, int]
    recent: list[EndpointRow]
    storage: StoreFigures


def _rows(ctx: ServerContext, where: list, order: list, limit: int) -> list[EndpointRow]:
    counts = (select(Cvd.endpoint_id, func.count(SnapshotRecord.id).label("n"))
              .join(SnapshotRecord, SnapshotRecord.cvd_id == Cvd.id)
              .group_by(Cvd.endpoint_id).subquery())
    q = (select(Endpoint.id, Endpoint.hostname, Endpoint.os, Endpoint.state,
                Endpoint.last_seen, Endpoint.last_ip, func.coalesce(counts.c.n, 0))
         .outerjoin(counts, counts.c.endpoint_id == Endpoint.id)
         .where(*where).order_by(*order).limit(limit))
    with ctx.session() as db:
        return [EndpointRow(*r) for r in db.execute(q)]


def _like(text: str) -> str:
    """A substring pattern in which the user's % and _ are plain characters."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def search_endpoints(ctx: ServerContext, text: str = "", state: str = "",
                     limit: int = SEARCH_ROWS) -> list[EndpointRow]:
    """Endpoints whose hostname, id, OS or address contains `text` (any case), most
    recently seen first."""
    where = []
    if text.strip():
        pattern = _like(text.strip().lower())
        where.append(or_(*(func.lower(col).like(pattern, escape="\\") for col in
                           (Endpoint.hostname, Endpoint.id, Endpoint.os, Endpoint.last_ip))))
    if state:
        where.append(Endpoint.state == state)
    return _rows(ctx, where, [Endpoint.last_seen.desc().nulls_last(), Endpoint.id],
                 min(limit, SEARCH_ROWS))


def overview(ctx: ServerContext) -> FleetOverview:
    with ctx.session() as db:
        by_state = {s: n for s, n in db.execute(
            select(Endpoint.state, func.count()).group_by(Endpoint.state))}
    storage = ctx.cached("console:storage", lambda: storage_figures(ctx),
                         ttl=STORAGE_CACHE_SECONDS)
    return FleetOverview(total=sum(by_state.values()), by_state=dict(sorted(by_state.items())),
                         recent=_rows(ctx, [], [Endpoint.last_seen.desc().nulls_last()],
                                      RECENT),
                         storage=storage)

"""The fleet at a glance, for the console: endpoints by state, the most recently seen,
search over the endpoint list. A few aggregate queries, whatever the fleet's size (the
admin API's per-endpoint detail costs several queries per endpoint)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import String, cast, func, or_, select

from strata.model.admin import StoreFigures, TaskInfo
from strata.server.catalog.models import (
    Assignment,
    Collection,
    Cvd,
    Endpoint,
    SnapshotRecord,
)
from strata.server.context import ServerContext
from strata.server.services.collections import collection_members
from strata.server.services.storage import storage_figures
from strata.server.services.tasks import recent_tasks

SEARCH_ROWS = 200  # one page of search results
RECENT = 10
RECENT_TASKS = 5
HISTORY_DAYS = 60  # days the storage chart covers
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
class HistoryPoint:
    day: str  # YYYY-MM-DD, UTC
    logical_bytes: int  # every kept snapshot taken up to that day, at full size
    new_bytes: int  # what those snapshots brought that the store did not hold yet


@dataclass(frozen=True)
class FleetOverview:
    total: int
    by_state: dict[str, int]
    recent: list[EndpointRow]
    storage: StoreFigures
    updates: dict[str, int]  # layer updates by state (assigned, downloading, ready, ...)
    tasks: list[TaskInfo]  # the latest tracked tasks
    history: list[HistoryPoint]


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


@dataclass(frozen=True)
class EndpointFilter:
    """What the endpoint list is narrowed to; empty fields do not narrow it."""

    text: str = ""  # in the hostname, id, OS or address, any case
    state: str = ""
    os: str = ""
    tag: str = ""
    collection: str = ""


def search_endpoints(ctx: ServerContext, f: EndpointFilter,
                     limit: int = SEARCH_ROWS) -> list[EndpointRow]:
    """The endpoints that pass the filter, most recently seen first."""
    where = []
    if f.text.strip():
        pattern = _like(f.text.strip().lower())
        where.append(or_(*(func.lower(col).like(pattern, escape="\\") for col in
                           (Endpoint.hostname, Endpoint.id, Endpoint.os, Endpoint.last_ip))))
    if f.state:
        where.append(Endpoint.state == f.state)
    if f.os:
        where.append(Endpoint.os == f.os)
    if f.tag:
        # Tags are a JSON list: its text holds the tag as a JSON string, quotes included,
        # on SQLite and PostgreSQL alike, so one pattern finds the whole tag only.
        where.append(cast(Endpoint.tags, String).like(_like(json.dumps(f.tag)),
                                                      escape="\\"))
    if f.collection:
        with ctx.session() as db:
            where.append(Endpoint.id.in_([e.id for e in collection_members(db, f.collection)]))
    return _rows(ctx, where, [Endpoint.last_seen.desc().nulls_last(), Endpoint.id],
                 min(limit, SEARCH_ROWS))


def filter_choices(ctx: ServerContext) -> dict[str, list[str]]:
    """What the list's drop-downs offer: the OS names and collections there are."""
    with ctx.session() as db:
        return {"os": [o for o in db.scalars(select(Endpoint.os).distinct()
                                              .order_by(Endpoint.os)) if o],
                "collections": list(db.scalars(select(Collection.name)
                                               .order_by(Collection.name)))}


def storage_history(ctx: ServerContext, days: int = HISTORY_DAYS) -> list[HistoryPoint]:
    """Logical against new bytes, day by day, over the snapshots kept: the growth of what
    the endpoints hold against the growth of what the store had to take in."""
    with ctx.session() as db:
        if db.get_bind().dialect.name == "postgresql":
            day = func.to_char(func.timezone("UTC", SnapshotRecord.time), "YYYY-MM-DD")
        else:  # SQLite keeps UTC text, 'YYYY-MM-DD HH:MM:SS...'
            day = func.substr(SnapshotRecord.time, 1, 10)
        rows = list(db.execute(select(day.label("day"), func.sum(SnapshotRecord.bytes_total),
                                      func.sum(SnapshotRecord.bytes_new))
                               .group_by("day").order_by("day")))
    points, logical, new = [], 0, 0
    for d, total, fresh in rows:
        logical, new = logical + int(total or 0), new + int(fresh or 0)
        points.append(HistoryPoint(str(d), logical, new))
    return points[-days:]


def overview(ctx: ServerContext) -> FleetOverview:
    with ctx.session() as db:
        by_state = {s: n for s, n in db.execute(
            select(Endpoint.state, func.count()).group_by(Endpoint.state))}
        updates = {s: n for s, n in db.execute(
            select(Assignment.state, func.count()).group_by(Assignment.state))}
    storage = ctx.cached("console:storage", lambda: storage_figures(ctx),
                         ttl=STORAGE_CACHE_SECONDS)
    history = ctx.cached("console:history", lambda: storage_history(ctx),
                         ttl=STORAGE_CACHE_SECONDS)
    return FleetOverview(total=sum(by_state.values()), by_state=dict(sorted(by_state.items())),
                         recent=_rows(ctx, [], [Endpoint.last_seen.desc().nulls_last()],
                                      RECENT),
                         storage=storage, updates=dict(sorted(updates.items())),
                         tasks=recent_tasks(ctx, RECENT_TASKS), history=history)

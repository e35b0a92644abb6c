"""Branch reflectors on the server: the registry (enroll, list, show, retire, reinstate,
quarantine), which reflector each agent downloads from and the ticket it is handed at
check-in, what a reflector itself may fetch (a ticket's layers and snapshots, or the
layers its endpoints are assigned, for warm-up), and what agents report about it.

A reflector authenticates as an endpoint does (an enrollment token, made for
reflectors, traded for a credential whose hash the catalog keeps) and holds no right of
its own to endpoint data: every chunk it fetches is one a ticket or its warm list allows.
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

import zstandard
from sqlalchemy import select
from sqlalchemy.orm import Session

from strata.errors import Forbidden, NotFound, StrataError
from strata.model.reflector import (
    ReflectorConfig,
    ReflectorEnrollRequest,
    ReflectorEnrollResponse,
    ReflectorInfo,
    ReflectorPoll,
    ReflectorProblem,
    ReflectorStats,
    WarmLayer,
)
from strata.model.tickets import Ticket, TicketRefused, verify_ticket
from strata.model.transfer import pack_stream
from strata.model.wire import DesiredState, ReflectorAssignment, ReflectorRoute
from strata.server.auth import digest, new_secret
from strata.server.catalog.models import Cvd, Endpoint, Layer, Reflector, SnapshotRecord
from strata.server.context import ServerContext
from strata.server.policies import bandwidth_for, get_policy, reflectors_for
from strata.server.services import audit
from strata.server.services.credentials import spend_token
from strata.server.services.layer_downloads import allowed_snapshots, stream_level
from strata.server.services.manifests import parse_chunk_ids
from strata.server.services.policies import cached_policy
from strata.server.services.snapshots import batch_sizes

TICKET_SECONDS = 3600  # a ticket's life: agents renew it at check-in or when it runs out
TICKET_REISSUE = 600.0  # a check-in within this long of the last gets the same ticket
WARM_CACHE = 5.0  # seconds a reflector's warm list is reused between its requests
ACTIVE, RETIRED, QUARANTINED = "active", "retired", "quarantined"


class ReflectorRefused(StrataError):
    """A reflector credential that is unknown, or a reflector that was retired."""

    http_status = 401


# -- which endpoints each reflector serves -------------------------------------------------


@dataclass
class ReflectorRoutes:
    """The endpoints each reflector was given at their last check-in. Kept in memory: it
    fills again within one check-in interval after a restart."""

    _by_reflector: dict[str, set[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, endpoint_id: str, reflector_ids: list[str]) -> None:
        with self._lock:
            for rid, eps in self._by_reflector.items():
                if rid not in reflector_ids:
                    eps.discard(endpoint_id)
            for rid in reflector_ids:
                self._by_reflector.setdefault(rid, set()).add(endpoint_id)

    def served(self, reflector_id: str) -> set[str]:
        with self._lock:
            return set(self._by_reflector.get(reflector_id, ()))


def warm_layers(ctx: ServerContext, reflector_id: str) -> dict[str, str]:
    """snapshot id -> NAME:VERSION of every IT layer that the endpoints routed to this
    reflector are assigned now: an assignment made a minute ago is on the list at the
    reflector's next poll, before those endpoints check in and ask. Cached briefly: each
    warm-up request checks against it."""
    return ctx.cached(f"warm:{reflector_id}", lambda: _warm_layers(ctx, reflector_id),
                      ttl=WARM_CACHE)


def _warm_layers(ctx: ServerContext, reflector_id: str) -> dict[str, str]:
    from strata.server.services.assignments import cached_desired

    served = sorted(ctx.reflector_routes.served(reflector_id))
    out: dict[str, str] = {}
    with ctx.session() as db:
        for i in range(0, len(served), 500):
            for ep in db.scalars(select(Endpoint).where(Endpoint.id.in_(served[i:i + 500]))):
                if ep.state != "active":
                    continue
                desired = cached_desired(ctx, ep)
                for dl in desired.layers if desired else []:
                    if dl.id is not None:  # IT layers only, never a CVD's snapshot
                        out[dl.snapshot] = f"{dl.name}:{dl.version}"
    return out


# -- enrollment and the registry -------------------------------------------------------------


def enroll(ctx: ServerContext, req: ReflectorEnrollRequest, ip: str) -> ReflectorEnrollResponse:
    """Trade a reflector enrollment token for a credential; the reflector is in the
    registry at once, and serves endpoints once a `reflectors` policy rule names it."""
    from strata.transport import fingerprint

    now = datetime.now(UTC)
    fp = ""
    if req.tls_cert:
        import ssl

        try:
            fp = fingerprint(ssl.PEM_cert_to_DER_cert(req.tls_cert))
        except ValueError:
            raise ReflectorRefused("the reflector's certificate is not a PEM certificate") \
                from None
    with ctx.write() as db:
        tok = spend_token(db, req.token, "reflector", now)
        credential = new_secret("sref")
        row = Reflector(id=str(uuid.uuid4()), name=req.name, url=req.url,
                        tls_cert=req.tls_cert, tls_fingerprint=fp, status=ACTIVE,
                        credential_hash=digest(credential), token_id=tok.id,
                        last_seen=now, last_ip=ip)
        db.add(row)
        rid = row.id
    audit.record(ctx, f"reflector:{rid}", "enroll-reflector", rid, name=req.name, url=req.url)
    ctx.invalidate()
    return ReflectorEnrollResponse(reflector_id=rid, credential=credential,
                                   ticket_key=ctx.tickets.public_key.hex())


def reflector_for_credential(ctx: ServerContext, credential: str) -> Reflector:
    """The reflector holding `credential`; ReflectorRefused if none, or it was retired."""
    key = digest(credential)

    def load() -> Reflector | None:
        with ctx.session() as db:
            row = db.scalar(select(Reflector).where(Reflector.credential_hash == key))
            if row is not None:
                db.expunge(row)
            return row
    row: Reflector | None = ctx.cached(f"reflector:{key}", load)
    if row is None:
        raise ReflectorRefused("unknown reflector credential: enroll this reflector again")
    if row.status == RETIRED:
        raise ReflectorRefused("this reflector was retired by an administrator")
    return row


def _find(db: Session, ref: str) -> Reflector:
    rows = list(db.scalars(select(Reflector).where(
        Reflector.id.startswith(ref.lower(), autoescape=True)).limit(2)))
    if not rows:
        rows = list(db.scalars(select(Reflector).where(Reflector.name == ref).limit(2)))
    if not rows:
        raise NotFound(f"no reflector {ref!r} (`strata reflector list`)")
    if len(rows) > 1:
        raise NotFound(f"reflector {ref!r} is ambiguous: give more of its id")
    return rows[0]


def _info(row: Reflector, rules: list[dict]) -> ReflectorInfo:
    named = [f"{'subnet ' + r['subnet'] if r.get('subnet') else ''}"
             f"{' ' if r.get('subnet') and r.get('site') else ''}"
             f"{'site ' + r['site'] if r.get('site') else ''}"
             for r in rules if row.id in r.get("reflectors", [])]
    return ReflectorInfo(id=row.id, name=row.name, url=row.url,
                         tls_fingerprint=row.tls_fingerprint, status=row.status,
                         status_reason=row.status_reason, enrolled_at=row.enrolled_at,
                         last_seen=row.last_seen, last_ip=row.last_ip,
                         bytes_from_server=row.bytes_from_server,
                         chunks_from_server=row.chunks_from_server, fallbacks=row.fallbacks,
                         bad_chunks=row.bad_chunks,
                         stats=ReflectorStats.model_validate(row.stats or {}), rules=named)


def list_reflectors(ctx: ServerContext) -> list[ReflectorInfo]:
    with ctx.session() as db:
        rules = get_policy(db, "reflectors").get("rules", [])
        rows = db.scalars(select(Reflector).order_by(Reflector.enrolled_at)).all()
        return [_info(r, rules) for r in rows]


def show_reflector(ctx: ServerContext, ref: str) -> ReflectorInfo:
    with ctx.session() as db:
        return _info(_find(db, ref), get_policy(db, "reflectors").get("rules", []))


def set_status(ctx: ServerContext, ref: str, status: str, *, actor: str,
               reason: str = "") -> ReflectorInfo:
    """Retire (its credential stops working), quarantine (out of rotation: agents go to
    the server) or reinstate a reflector. Agents follow from their next check-in."""
    with ctx.write() as db:
        row = _find(db, ref)
        if row.status == RETIRED and status != RETIRED:
            raise StrataError(f"reflector {row.id} was retired: enroll it again")
        row.status, row.status_reason = status, reason[:500]
        rid = row.id
    ctx.invalidate()  # the credential and route caches: in force at the next request
    action = {ACTIVE: "reinstate", RETIRED: "retire", QUARANTINED: "quarantine"}[status]
    audit.record(ctx, actor, f"{action}-reflector", rid, reason=reason[:500])
    return show_reflector(ctx, rid)


def check_known(ctx: ServerContext, rules: list[dict]) -> None:
    """Every reflector id a policy names is an enrolled reflector (a typo would send a
    branch to the server silently)."""
    wanted = {rid for r in rules for rid in r.get("reflectors", [])}
    if not wanted:
        return
    with ctx.session() as db:
        known = set(db.scalars(select(Reflector.id).where(Reflector.id.in_(wanted))))
    unknown = sorted(wanted - known)
    if unknown:
        raise NotFound(f"no reflector {unknown[0]!r} (`strata reflector list`): the policy "
                       "names reflectors by their full id")


# -- check-in: the route and the ticket ------------------------------------------------------


def _active(ctx: ServerContext) -> dict[str, ReflectorAssignment]:
    def load() -> dict[str, ReflectorAssignment]:
        with ctx.session() as db:
            rows = db.scalars(select(Reflector).where(Reflector.status == ACTIVE)).all()
            return {r.id: ReflectorAssignment(id=r.id, url=r.url, tls_cert=r.tls_cert)
                    for r in rows}
    return ctx.cached("reflectors:active", load)


def route_for(ctx: ServerContext, ep: Endpoint, *, site: str, addresses: list[str],
              desired: DesiredState | None) -> ReflectorRoute | None:
    """The reflectors the policy gives this endpoint (active ones, in the rule's order)
    and a ticket for what its desired state names; None: it downloads from the server."""
    rules = ctx.cached("policy:reflectors", lambda: _policy(ctx)).get("rules", [])
    active = _active(ctx) if rules else {}
    chosen = [active[rid] for rid in reflectors_for(rules, addresses, site) if rid in active]
    ids = [r.id for r in chosen]
    if ids or rules:  # (a fleet without reflectors pays nothing at check-in)
        ctx.reflector_routes.note(ep.id, ids)
    if not chosen:
        return None
    key = f"ticket:{ep.id}:{desired.key if desired else ''}:{','.join(ids)}"
    ticket, expires = ctx.cached(key, lambda: _issue(ctx, ep, ids), ttl=TICKET_REISSUE)
    return ReflectorRoute(reflectors=chosen, ticket=ticket,
                          expires=datetime.fromtimestamp(expires, UTC))


def _policy(ctx: ServerContext) -> dict:
    with ctx.session() as db:
        return get_policy(db, "reflectors")


def _issue(ctx: ServerContext, ep: Endpoint, reflector_ids: list[str]) -> tuple[str, int]:
    now = int(time.time())
    ticket = Ticket(endpoint=ep.id, reflectors=tuple(reflector_ids),
                    snapshots=frozenset(allowed_snapshots(ctx, ep)), own_cvd=True,
                    issued=now, expires=now + TICKET_SECONDS)
    return ctx.tickets.sign(ticket), ticket.expires


def renew_ticket(ctx: ServerContext, ep: Endpoint, site: str,
                 addresses: list[str]) -> ReflectorRoute | None:
    """A fresh route and ticket between check-ins (a long download outlived its ticket)."""
    from strata.server.services.assignments import cached_desired

    return route_for(ctx, ep, site=site, addresses=addresses, desired=cached_desired(ctx, ep))


# -- what a reflector may fetch ----------------------------------------------------------------


def _ticket(ctx: ServerContext, refl: Reflector, text: str) -> Ticket:
    ticket = verify_ticket(text, ctx.tickets.public_key, reflector=refl.id, now=time.time())
    with ctx.session() as db:
        ep = db.get(Endpoint, ticket.endpoint)
        if ep is None or ep.state != "active":
            raise TicketRefused("the endpoint this ticket was issued to may no longer read")
    return ticket


def _owns(ctx: ServerContext, endpoint_id: str, sid: str) -> bool:
    with ctx.session() as db:
        return db.scalar(select(SnapshotRecord.id).join(Cvd, Cvd.id == SnapshotRecord.cvd_id)
                         .where(SnapshotRecord.id == sid, Cvd.endpoint_id == endpoint_id)
                         ) is not None


def readable(ctx: ServerContext, refl: Reflector, ticket: str, snapshot: str | None
             ) -> list[str]:
    """The store snapshots whose chunks `refl` may fetch with this request: what the
    ticket allows (its layers, or one of its endpoint's own snapshots), or without a
    ticket, the layers the endpoints routed to it are assigned (warm-up)."""
    if refl.status != ACTIVE:
        raise Forbidden(f"this reflector is {refl.status}: it serves no endpoint now")
    if not ticket:
        if snapshot is not None:
            raise Forbidden("a snapshot is read with the ticket of the endpoint it belongs to")
        return sorted(warm_layers(ctx, refl.id))
    t = _ticket(ctx, refl, ticket)
    if snapshot is None:
        return sorted(t.snapshots)
    if snapshot in t.snapshots or (t.own_cvd and _owns(ctx, t.endpoint, snapshot)):
        return [snapshot]
    # Another endpoint's snapshot reads exactly like one that does not exist.
    raise NotFound(f"no snapshot {snapshot[:8]} for this ticket")


def chunk_ids(ctx: ServerContext, refl: Reflector, sid: str, ticket: str) -> bytes:
    """The ids of every chunk snapshot `sid` needs (32 bytes each, zstd): what the
    reflector checks an endpoint's requests against, and warms in this order, the
    tree's (its manifest's chunks first), which is what makes a download stream compress
    (Plan.chunks_in_order does the same for agents)."""
    if sid not in readable(ctx, refl, ticket, sid if ticket else None):
        raise NotFound(f"no layer or snapshot {sid[:8]} for this reflector")
    snap = ctx.store.load_snapshot(sid)
    ids = dict.fromkeys(snap.manifest_chunk_ids())
    for entry in ctx.store.iter_manifest(snap):
        ids.update(dict.fromkeys(c for c, _ in entry.chunks))
    return zstandard.ZstdCompressor(level=3).compress(b"".join(ids))


def check_chunks(ctx: ServerContext, refl: Reflector, sid: str, hex_ids: list[str],
                 ticket: str) -> None:
    """Forbidden unless the ticket lets `refl` read snapshot `sid` and it holds every one
    of these chunks (NotFound for another endpoint's snapshot, as for one that does not
    exist)."""
    if not ticket:
        raise Forbidden("a snapshot is read with the ticket of the endpoint it belongs to")
    ids = list(dict.fromkeys(parse_chunk_ids(hex_ids)))
    sids = readable(ctx, refl, ticket, sid)
    ctx.holdings.index_snapshot(sid, functools.partial(ctx.snapshot_chunks, sid))
    if len(ctx.holdings.in_snapshots(sids, ids)) < len(ids):
        raise Forbidden("a requested chunk is not part of that snapshot")


def chunks(ctx: ServerContext, refl: Reflector, hex_ids: list[str], ticket: str,
           snapshot: str | None) -> bytes:
    """Chunks for a reflector, as the one zstd stream the agents' downloads use; each one
    must belong to what `readable` allows. Counted on its record."""
    ids = list(dict.fromkeys(parse_chunk_ids(hex_ids)))
    sids = readable(ctx, refl, ticket, snapshot)
    for sid in sids:
        ctx.holdings.index_snapshot(sid, functools.partial(ctx.snapshot_chunks, sid))
    if len(ctx.holdings.in_snapshots(sids, ids)) < len(ids):
        raise Forbidden("a requested chunk is not part of what this reflector may read")
    sizes = batch_sizes(ctx, ids)

    with ctx.session() as db:  # IT layers take the top level, a CVD a faster one
        layer_sids = sorted(db.scalars(select(Layer.snapshot).where(
            Layer.snapshot.in_(sids))).all()) if sids else []
    level = stream_level(ctx, layer_sids, ids, sizes)

    def make() -> bytes:
        return pack_stream([(cid, ctx.store.load_chunk(cid)) for cid in ids], level)

    body = ctx.streams.get_or_make(level, ids, make)
    with ctx.write() as db:
        row = db.get(Reflector, refl.id)
        if row is not None:
            row.bytes_from_server += len(body)
            row.chunks_from_server += len(ids)
    return body


def serving(ctx: ServerContext, ep: Endpoint, wanted: list[str]) -> list[str]:
    """Those of `wanted` that are active and that the server routed this endpoint to at
    its last check-in (what a delta ticket may name)."""
    active = _active(ctx)
    return [rid for rid in dict.fromkeys(wanted)
            if rid in active and ep.id in ctx.reflector_routes.served(rid)]


def delta(ctx: ServerContext, refl: Reflector, did: str, ticket: str) -> bytes:
    """A delta's body for a reflector, if the endpoint's delta ticket names it (the server
    checked, when it signed the ticket, that the endpoint holds every old file of the
    group). Counted on the reflector's record."""
    from strata.server.metrics import DELTAS
    from strata.server.services.deltas import delta_by_id

    if refl.status != ACTIVE:
        raise Forbidden(f"this reflector is {refl.status}: it serves no endpoint now")
    t = _ticket(ctx, refl, ticket)
    if did not in t.deltas:
        raise NotFound(f"no delta {did[:8]} for this ticket")
    body = delta_by_id(ctx, bytes.fromhex(did))
    if body is None:
        raise NotFound(f"delta {did[:8]} is no longer cached: the agent asks the server")
    DELTAS.labels("to-reflector").inc()
    with ctx.write() as db:
        row = db.get(Reflector, refl.id)
        if row is not None:
            row.bytes_from_server += len(body)
    return body


def poll(ctx: ServerContext, refl: Reflector, stats: ReflectorPoll, ip: str) -> ReflectorConfig:
    """A reflector's periodic visit: its counters and location in; its status, warm list
    and bandwidth caps (the rules for its site and subnet, as for an agent) out."""
    now = datetime.now(UTC)
    with ctx.write() as db:
        row = db.get(Reflector, refl.id)
        if row is not None:
            row.last_seen, row.last_ip = now, ip
            row.stats = ReflectorStats.model_validate(stats.model_dump()).model_dump()
        rules = cached_policy(ctx, db, "bandwidth").get("rules", [])
    local = now.astimezone(timezone(timedelta(minutes=stats.utc_offset_minutes or 0)))
    caps = bandwidth_for(rules, [a for a in (stats.subnet, ip) if a], stats.site or "", local)
    warm = warm_layers(ctx, refl.id) if refl.status == ACTIVE else {}
    return ReflectorConfig(reflector_id=refl.id, status=refl.status,
                           ticket_key=ctx.tickets.public_key.hex(),
                           warm=[WarmLayer(name=n, snapshot=s) for s, n in sorted(warm.items())],
                           bandwidth=caps)


# -- what agents report ------------------------------------------------------------------------


def report_problem(ctx: ServerContext, ep: Endpoint, report: ReflectorProblem) -> bool:
    """An agent went around a reflector. Counted; a chunk that failed its id takes the
    reflector out of rotation at once (only an endpoint the reflector serves is heard:
    at worst a hostile one sends its branch to the server, never to bad data)."""
    if ep.id not in ctx.reflector_routes.served(report.reflector_id):
        return False
    corrupt = report.problem == "corrupt"
    with ctx.write() as db:
        row = db.get(Reflector, report.reflector_id)
        if row is None:
            return False
        row.fallbacks += 1
        if corrupt:
            row.bad_chunks += 1
            if row.status == ACTIVE:
                row.status = QUARANTINED
                row.status_reason = (f"served a chunk that failed its id to endpoint "
                                     f"{ep.id}: {report.detail}")[:500]
    audit.record(ctx, f"endpoint:{ep.id}", "reflector-" + report.problem, report.reflector_id,
                 detail=report.detail, chunk=report.chunk)
    if corrupt:
        ctx.invalidate()  # out of every route from the next check-in
    return True


"""Enrolled endpoints as administrators see them: list and detail (inventory, CVD,
assignment, transactions), approval and revocation, tags, deletion, and the transaction
log."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from strata.errors import Conflict
from strata.model.admin import (
    EndpointDeleted,
    EndpointDetail,
    EndpointState,
    EndpointSummary,
    EndpointTags,
    SnapshotRow,
    TagsRequest,
    TransactionInfo,
)
from strata.server.catalog.models import (
    Assignment,
    Collection,
    Endpoint,
    SnapshotRecord,
    Transaction,
)
from strata.server.context import ServerContext
from strata.server.services import audit, snapshots, usage
from strata.server.services.assignments import assignment_status
from strata.server.services.lookup import find_endpoint

MAX_ROWS = 1000  # one answer lists at most this many records
RECENT_TRANSACTIONS = 20  # in an endpoint's detail


def _summary(db: Session, ep: Endpoint) -> dict[str, Any]:
    cvd = snapshots.cvd_of(db, ep.id)
    count = db.scalar(select(func.count()).select_from(SnapshotRecord)
                      .where(SnapshotRecord.cvd_id == cvd.id)) if cvd else 0
    return {"id": ep.id, "hostname": ep.hostname, "os": ep.os, "state": ep.state,
            "enrolled_at": ep.enrolled_at, "last_seen": ep.last_seen, "last_ip": ep.last_ip,
            "last_snapshot": cvd.last_snapshot if cvd else None, "snapshots": count or 0,
            "tags": ep.tags, "inventory": ep.inventory, "layers": assignment_status(db, ep)}


def list_endpoints(ctx: ServerContext, pending: bool = False) -> list[EndpointSummary]:
    with ctx.session() as db:
        q = select(Endpoint).order_by(Endpoint.enrolled_at)
        if pending:
            q = q.where(Endpoint.state == "pending")
        return [EndpointSummary(**_summary(db, ep)) for ep in db.scalars(q)]


def endpoint_detail(ctx: ServerContext, ref: str) -> EndpointDetail:
    with ctx.session() as db:
        ep = find_endpoint(db, ref)
        snaps = snapshots.cvd_snapshots(db, ep.id)
        txs = db.scalars(select(Transaction).where(Transaction.endpoint_id == ep.id)
                         .order_by(Transaction.id.desc()).limit(RECENT_TRANSACTIONS))
        return EndpointDetail(
            **_summary(db, ep),
            snapshot_list=[SnapshotRow(id=s.id, time=s.time, trigger=s.trigger, files=s.files,
                                       bytes_total=s.bytes_total, bytes_new=s.bytes_new)
                           for s in snaps],
            transactions=[transaction_info(t) for t in txs])


def _set_state(ctx: ServerContext, ref: str, state: str, action: str,
               actor: str) -> EndpointState:
    with ctx.write() as db:
        ep = find_endpoint(db, ref)
        if state == "active" and ep.state == "revoked":
            raise Conflict("a revoked endpoint cannot be approved; enroll it again")
        ep.state = state
        eid = ep.id
    ctx.invalidate()  # cached credentials must see the new state at once
    audit.record(ctx, actor, action, eid)
    return EndpointState(id=eid, state=state)


def approve(ctx: ServerContext, ref: str, *, actor: str) -> EndpointState:
    return _set_state(ctx, ref, "active", "approve-endpoint", actor)


def revoke(ctx: ServerContext, ref: str, *, actor: str) -> EndpointState:
    return _set_state(ctx, ref, "revoked", "revoke-endpoint", actor)


def set_tags(ctx: ServerContext, ref: str, req: TagsRequest, *, actor: str) -> EndpointTags:
    """Replace the endpoint's tags (collection rules match them)."""
    with ctx.write() as db:
        ep = find_endpoint(db, ref)
        ep.tags = sorted(set(req.tags))
        tags, eid = ep.tags, ep.id
    ctx.invalidate()
    audit.record(ctx, actor, "tag-endpoint", eid, tags=tags)
    return EndpointTags(endpoint=eid, tags=tags)


def transaction_info(t: Transaction) -> TransactionInfo:
    return TransactionInfo(
        id=t.id, endpoint=t.endpoint_id, kind=t.kind, started=t.started, finished=t.finished,
        snapshot=t.snapshot, files_changed=t.files_changed,
        bytes_before_dedup=t.bytes_before_dedup, bytes_after_dedup=t.bytes_after_dedup,
        bytes_on_wire=t.bytes_on_wire, seconds=t.seconds, result=t.result,
        retries=t.retries, error=t.error)


def transactions(ctx: ServerContext, endpoint: str | None = None,
                 limit: int = 100) -> list[TransactionInfo]:
    """The latest centralizations, uploads and restores, newest first."""
    with ctx.session() as db:
        q = select(Transaction).order_by(Transaction.id.desc()).limit(min(limit, MAX_ROWS))
        if endpoint:
            q = q.where(Transaction.endpoint_id == find_endpoint(db, endpoint).id)
        return [transaction_info(t) for t in db.scalars(q)]


def delete_endpoint(ctx: ServerContext, ref: str, *, actor: str) -> EndpointDeleted:
    """Delete an endpoint (an orphan left by a re-enrollment, a machine gone for good)
    with its CVD: its credential stops working at once, its snapshots go from the
    catalog and the store, and its collection memberships, assignment and transaction
    log with it. The audit log keeps the record of it."""
    with ctx.write() as db:
        ep = find_endpoint(db, ref)
        eid, hostname = ep.id, ep.hostname
        cvd = snapshots.cvd_of(db, eid)
        sids = [s.id for s in snapshots.cvd_snapshots(db, eid)]
        if sids:
            db.execute(delete(SnapshotRecord).where(SnapshotRecord.id.in_(sids)))
        if cvd is not None:
            db.delete(cvd)
        db.execute(delete(Transaction).where(Transaction.endpoint_id == eid))
        db.execute(delete(Assignment).where(Assignment.endpoint_id == eid))
        usage.forget(db, eid)
        for col in db.scalars(select(Collection)):
            if eid in (col.members or []):
                col.members = [m for m in col.members if m != eid]
        db.flush()
        db.delete(ep)
    # After the catalog: a snapshot the catalog no longer names is only unreferenced
    # data, which prune frees; the other order could leave a record without its snapshot.
    for sid in sids:
        ctx.store.remove_snapshot(sid)  # a missing one is no error (backend contract)
    ctx.holdings.forget_endpoint(eid)
    ctx.invalidate()
    audit.record(ctx, actor, "delete-endpoint", eid, hostname=hostname, snapshots=len(sids))
    return EndpointDeleted(deleted=eid, hostname=hostname, snapshots=len(sids))

"""The admin API: enrollment tokens, endpoints (approve, revoke, inspect), policies,
snapshots, transactions, the audit log and storage figures. Every change is audited."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from strata.engine.stats import store_stats
from strata.server.auth import digest, new_secret
from strata.server.catalog.models import (
    AuditEntry,
    Cvd,
    Endpoint,
    EnrollmentToken,
    Policy,
    SnapshotRecord,
    Transaction,
)
from strata.server.context import ServerContext
from strata.server.deps import audit, get_ctx, require_admin
from strata.server.layers import assignment_doc
from strata.server.policies import DEFAULTS, get_policy, validate_policy

router = APIRouter(prefix="/api/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


class TokenCreate(BaseModel):
    uses: int | None = Field(default=1, ge=1)  # None: unlimited
    expires: str | None = "24h"  # e.g. 30m, 24h, 7d; None: never
    require_approval: bool = False


class TokenCreated(BaseModel):
    id: int
    token: str
    uses: int | None
    expires_at: datetime | None
    require_approval: bool


def parse_duration(text: str) -> timedelta:
    m = re.fullmatch(r"(\d+)\s*([smhd])", text.strip())
    if not m:
        raise HTTPException(422, f"not a duration: {text!r} (e.g. 30m, 24h, 7d)")
    return timedelta(seconds=int(m.group(1)) * {"s": 1, "m": 60, "h": 3600,
                                                  "d": 86400}[m.group(2)])


@router.post("/tokens", response_model=TokenCreated)
def create_token(body: TokenCreate, ctx: ServerContext = Depends(get_ctx)) -> TokenCreated:
    token = new_secret("senr")
    expires = datetime.now(UTC) + parse_duration(body.expires) if body.expires else None
    with ctx.write() as db:
        row = EnrollmentToken(token_hash=digest(token), uses_left=body.uses, expires_at=expires,
                              require_approval=body.require_approval)
        db.add(row)
        db.commit()
        tid = row.id
    audit(ctx, "admin", "create-token", str(tid), uses=body.uses, expires=body.expires,
          require_approval=body.require_approval)
    return TokenCreated(id=tid, token=token, uses=body.uses, expires_at=expires,
                        require_approval=body.require_approval)


def _endpoint_doc(ep: Endpoint, cvd: Cvd | None, snapshots: int) -> dict:
    return {"id": ep.id, "hostname": ep.hostname, "os": ep.os, "state": ep.state,
            "enrolled_at": ep.enrolled_at, "last_seen": ep.last_seen, "last_ip": ep.last_ip,
            "last_snapshot": cvd.last_snapshot if cvd else None, "snapshots": snapshots,
            "tags": ep.tags, "inventory": ep.inventory}


@router.get("/endpoints")
def list_endpoints(pending: bool = False, ctx: ServerContext = Depends(get_ctx)) -> list[dict]:
    with ctx.session() as db:
        q = select(Endpoint).order_by(Endpoint.enrolled_at)
        if pending:
            q = q.where(Endpoint.state == "pending")
        out = []
        for ep in db.scalars(q):
            cvd = db.scalar(select(Cvd).where(Cvd.endpoint_id == ep.id))
            n = db.scalar(select(func.count()).select_from(SnapshotRecord)
                          .where(SnapshotRecord.cvd_id == cvd.id)) if cvd else 0
            doc = _endpoint_doc(ep, cvd, n or 0)
            doc["layers"] = assignment_doc(db, ep)
            out.append(doc)
        return out


def _find_endpoint(db: object, ref: str) -> Endpoint:
    # autoescape: an id prefix is text, not a LIKE pattern ('%' must not match everything).
    # Lower case: ids are lower-case UUIDs, and LIKE ignores case on SQLite but not on
    # PostgreSQL, so 'ABC' finds the same endpoint on both.
    rows = list(db.scalars(select(Endpoint).where(  # type: ignore[attr-defined]
        Endpoint.id.startswith(ref.lower(), autoescape=True))))
    if len(rows) != 1:
        raise HTTPException(404, f"no endpoint {ref!r}" if not rows
                            else f"endpoint id {ref!r} is ambiguous")
    return rows[0]


@router.get("/endpoints/{ref}")
def show_endpoint(ref: str, ctx: ServerContext = Depends(get_ctx)) -> dict:
    with ctx.session() as db:
        ep = _find_endpoint(db, ref)
        cvd = db.scalar(select(Cvd).where(Cvd.endpoint_id == ep.id))
        snaps = list(db.scalars(select(SnapshotRecord).where(SnapshotRecord.cvd_id == cvd.id)
                                .order_by(SnapshotRecord.time))) if cvd else []
        txs = list(db.scalars(select(Transaction).where(Transaction.endpoint_id == ep.id)
                              .order_by(Transaction.id.desc()).limit(20)))
        doc = _endpoint_doc(ep, cvd, len(snaps))
        doc["layers"] = assignment_doc(db, ep)
        doc["snapshot_list"] = [{"id": s.id, "time": s.time, "trigger": s.trigger,
                                 "files": s.files, "bytes_total": s.bytes_total,
                                 "bytes_new": s.bytes_new} for s in snaps]
        doc["transactions"] = [_tx_doc(t) for t in txs]
        return doc


def _set_state(ctx: ServerContext, ref: str, state: str, action: str) -> dict:
    with ctx.write() as db:
        ep = _find_endpoint(db, ref)
        if state == "active" and ep.state == "revoked":
            raise HTTPException(409, "a revoked endpoint cannot be approved; enroll it again")
        ep.state = state
        eid = ep.id
    ctx.invalidate()  # cached credentials must see the new state at once
    audit(ctx, "admin", action, eid)
    return {"id": eid, "state": state}


@router.post("/endpoints/{ref}/approve")
def approve(ref: str, ctx: ServerContext = Depends(get_ctx)) -> dict:
    return _set_state(ctx, ref, "active", "approve-endpoint")


@router.post("/endpoints/{ref}/revoke")
def revoke(ref: str, ctx: ServerContext = Depends(get_ctx)) -> dict:
    return _set_state(ctx, ref, "revoked", "revoke-endpoint")


@router.get("/policies/{kind}")
def read_policy(kind: str, ctx: ServerContext = Depends(get_ctx)) -> dict:
    if kind not in DEFAULTS:
        raise HTTPException(404, f"no policy kind {kind!r} (one of {', '.join(DEFAULTS)})")
    with ctx.session() as db:
        return get_policy(db, kind)


@router.put("/policies/{kind}")
def write_policy(kind: str, document: dict, ctx: ServerContext = Depends(get_ctx)) -> dict:
    if kind not in DEFAULTS:
        raise HTTPException(404, f"no policy kind {kind!r} (one of {', '.join(DEFAULTS)})")
    try:
        doc = validate_policy(kind, document)
    except (ValueError, TypeError) as exc:
        raise HTTPException(422, f"invalid {kind} policy: {exc}") from None
    with ctx.write() as db:
        row = db.get(Policy, kind)
        if row is None:
            db.add(Policy(kind=kind, document=doc))
        else:
            row.document, row.updated_at = doc, datetime.now(UTC)
        db.commit()
    ctx.invalidate()
    audit(ctx, "admin", "set-policy", kind, document=doc)
    return doc


def _tx_doc(t: Transaction) -> dict:
    return {"id": t.id, "endpoint": t.endpoint_id, "kind": t.kind, "started": t.started,
            "finished": t.finished, "snapshot": t.snapshot, "files_changed": t.files_changed,
            "bytes_before_dedup": t.bytes_before_dedup, "bytes_after_dedup": t.bytes_after_dedup,
            "bytes_on_wire": t.bytes_on_wire, "seconds": t.seconds, "result": t.result,
            "retries": t.retries, "error": t.error}


@router.get("/transactions")
def transactions(endpoint: str | None = None, limit: int = 100,
                 ctx: ServerContext = Depends(get_ctx)) -> list[dict]:
    with ctx.session() as db:
        q = select(Transaction).order_by(Transaction.id.desc()).limit(min(limit, 1000))
        if endpoint:
            q = q.where(Transaction.endpoint_id == _find_endpoint(db, endpoint).id)
        return [_tx_doc(t) for t in db.scalars(q)]


@router.get("/audit")
def audit_log(limit: int = 100, ctx: ServerContext = Depends(get_ctx)) -> list[dict]:
    with ctx.session() as db:
        rows = db.scalars(select(AuditEntry).order_by(AuditEntry.id.desc())
                          .limit(min(limit, 1000)))
        return [{"time": a.time, "actor": a.actor, "action": a.action, "target": a.target,
                 "detail": a.detail} for a in rows]


@router.get("/stats")
def stats(ctx: ServerContext = Depends(get_ctx)) -> dict:
    return store_stats(ctx.store).to_dict()

"""The audit log: every change an administrator or an endpoint makes, and who made it."""

from __future__ import annotations

from sqlalchemy import select

from strata.model.admin import AuditEntryInfo
from strata.server.catalog.models import AuditEntry
from strata.server.context import ServerContext

MAX_ROWS = 1000  # one answer lists at most this many records


def record(ctx: ServerContext, actor: str, action: str, target: str = "",
           **detail: object) -> None:
    """Log one action. `actor` is "admin" (the break-glass token), "user:NAME",
    "portal:NAME", "endpoint:ID" or "server"."""
    with ctx.write() as db:
        db.add(AuditEntry(actor=actor, action=action, target=target, detail=detail))


def audit_log(ctx: ServerContext, limit: int = 100,
              actor_contains: str = "") -> list[AuditEntryInfo]:
    """The latest records, newest first; only those whose actor contains
    `actor_contains` (plain text, not a pattern) if given."""
    q = select(AuditEntry)
    if actor_contains:
        q = q.where(AuditEntry.actor.contains(actor_contains, autoescape=True))
    with ctx.session() as db:
        rows = db.scalars(q.order_by(AuditEntry.id.desc()).limit(min(limit, MAX_ROWS)))
        return [AuditEntryInfo(time=a.time, actor=a.actor, action=a.action, target=a.target,
                               detail=a.detail) for a in rows]

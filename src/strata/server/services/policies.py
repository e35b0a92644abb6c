"""Policies an administrator reads and replaces (upload, retention, bandwidth, layer
rules; their defaults and validation are in server/policies.py), and the policy one
endpoint receives at check-in."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from strata.errors import Invalid, NotFound
from strata.model.admin import PolicyDocument
from strata.model.wire import AgentPolicy
from strata.server.catalog.models import Endpoint, Policy
from strata.server.context import ServerContext
from strata.server.policies import DEFAULTS, bandwidth_for, get_policy, validate_policy
from strata.server.services import audit
from strata.server.services.facts import endpoint_family


def _known(kind: str) -> None:
    if kind not in DEFAULTS:
        raise NotFound(f"no policy kind {kind!r} (one of {', '.join(DEFAULTS)})")


def read_policy(ctx: ServerContext, kind: str) -> PolicyDocument:
    _known(kind)
    with ctx.session() as db:
        return get_policy(db, kind)


def write_policy(ctx: ServerContext, kind: str, document: PolicyDocument, *,
                 actor: str) -> PolicyDocument:
    _known(kind)
    try:
        doc = validate_policy(kind, document)
    except (ValueError, TypeError) as exc:
        raise Invalid(f"invalid {kind} policy: {exc}") from None
    with ctx.write() as db:
        row = db.get(Policy, kind)
        if row is None:
            db.add(Policy(kind=kind, document=doc))
        else:
            row.document, row.updated_at = doc, datetime.now(UTC)
    ctx.invalidate()  # every check-in reads policies through the cache
    audit.record(ctx, actor, "set-policy", kind, document=doc)
    return doc


def cached_policy(ctx: ServerContext, db: Session, kind: str) -> dict[str, Any]:
    return ctx.cached(f"policy:{kind}", lambda: get_policy(db, kind))


def agent_policy(ctx: ServerContext, db: Session, ep: Endpoint, now: datetime,
                 ip: str = "") -> AgentPolicy:
    """What the endpoint must exclude, how often it centralizes, and its bandwidth now
    (by subnet, site and time of day)."""
    upload = cached_policy(ctx, db, "upload")
    rules = cached_policy(ctx, db, "bandwidth")
    site = str((ep.inventory or {}).get("site", ""))
    return AgentPolicy(
        interval_seconds=int(upload.get("interval_seconds", 3600)),
        exclusions=list(upload.get("exclusions", {}).get(endpoint_family(ep), [])),
        bandwidth=bandwidth_for(rules.get("rules", []), ip or ep.last_ip, site, now))

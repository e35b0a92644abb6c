"""Policies an administrator reads, plans (what a partial or whole document would
change, and what a retention change would remove), replaces and resets (upload,
retention, bandwidth, layer rules; their defaults, validation and merge are in
server/policies.py), and the policy one endpoint receives at check-in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy.orm import Session

from strata.errors import Conflict, Invalid, NotFound
from strata.model.admin import (
    PolicyChange,
    PolicyDocument,
    PolicyPlan,
    PolicyPlanRequest,
    RetentionLoss,
    policy_revision,
)
from strata.model.wire import AgentPolicy
from strata.server.catalog.models import Endpoint, Policy
from strata.server.context import ServerContext
from strata.server.policies import (
    DEFAULTS,
    bandwidth_for,
    get_policy,
    merge_policy,
    policy_changes,
    validate_policy,
)
from strata.server.services import audit
from strata.server.services.facts import endpoint_family
from strata.server.services.retention import plan_retention


def _known(kind: str) -> None:
    if kind not in DEFAULTS:
        raise NotFound(f"no policy kind {kind!r} (one of {', '.join(DEFAULTS)})")


def read_policy(ctx: ServerContext, kind: str) -> PolicyDocument:
    _known(kind)
    with ctx.session() as db:
        return get_policy(db, kind)


def _validated(kind: str, document: dict, ctx: ServerContext | None = None) -> dict:
    try:
        doc = validate_policy(kind, document)
    except (ValueError, TypeError) as exc:
        raise Invalid(f"invalid {kind} policy: {exc}") from None
    if kind == "reflectors" and ctx is not None:
        from strata.server.services.reflectors import check_known

        check_known(ctx, doc["rules"])
    return doc


def _changes(before: dict, after: dict) -> list[PolicyChange]:
    return [PolicyChange(key=k, before=b, after=a)  # type: ignore[arg-type]
            for k, b, a in policy_changes(before, after)]


def plan_policy(ctx: ServerContext, kind: str, req: PolicyPlanRequest) -> PolicyPlan:
    """What storing `req` would change, and for retention what every endpoint would lose
    at the next maintenance; nothing is stored."""
    _known(kind)
    with ctx.session() as db:
        current = get_policy(db, kind)
        if req.document is None:
            proposed = DEFAULTS[kind]
        elif req.replace:
            proposed = req.document
        else:
            proposed = merge_policy(current, req.document)
        doc = _validated(kind, proposed, ctx)
        losses = []
        if kind == "retention":
            losses = [RetentionLoss(endpoint_id=c.endpoint_id, hostname=c.hostname,
                                    snapshots=c.snapshots, removed=len(c.removed),
                                    revert_points_removed=c.revert_points_removed)
                      for c in plan_retention(db, doc) if c.removed]
    return PolicyPlan(kind=kind, document=doc, changes=_changes(current, doc),
                      retention=losses, revision=policy_revision(current))


def _check_revision(db: Session, kind: str, expected: str | None) -> dict:
    """The stored document, locked for this transaction; refused if it is no longer the
    revision the administrator reviewed (`expected`; None: no check)."""
    row = db.get(Policy, kind, with_for_update=True)
    current = row.document if row else DEFAULTS[kind]
    now = policy_revision(current)
    if expected is not None and expected != now:
        raise Conflict(f"the {kind} policy changed since revision {expected} (it is now "
                       f"revision {now}): review it again (strata policy diff {kind} FILE), "
                       "or overwrite it with --force")
    return current


def write_policy(ctx: ServerContext, kind: str, document: PolicyDocument, *,
                 actor: str, expected: str | None = None) -> PolicyDocument:
    """Replace the kind's document, if it is still at revision `expected` (when given);
    the audit record holds what changed."""
    _known(kind)
    doc = _validated(kind, document, ctx)
    with ctx.write() as db:
        before = _check_revision(db, kind, expected)
        row = db.get(Policy, kind)
        if row is None:
            db.add(Policy(kind=kind, document=doc))
        else:
            row.document, row.updated_at = doc, datetime.now(UTC)
    ctx.invalidate()  # every check-in reads policies through the cache
    audit.record(ctx, actor, "set-policy", kind, document=doc,
                 changes=[c.model_dump(mode="json") for c in _changes(before, doc)])
    return doc


def reset_policy(ctx: ServerContext, kind: str, *, actor: str,
                 expected: str | None = None) -> PolicyDocument:
    """Back to the built-in default (the stored document goes), if still at revision
    `expected` (when given); audited with what changed."""
    _known(kind)
    with ctx.write() as db:
        before = _check_revision(db, kind, expected)
        row = db.get(Policy, kind)
        if row is not None:
            db.delete(row)
    ctx.invalidate()
    audit.record(ctx, actor, "reset-policy", kind,
                 changes=[c.model_dump(mode="json") for c in _changes(before, DEFAULTS[kind])])
    return DEFAULTS[kind]


def cached_policy(ctx: ServerContext, db: Session | None, kind: str) -> dict[str, Any]:
    """The policy document (cached); read in `db`, or in a session of its own when None
    (a check-in, which nearly always finds it cached, opens none)."""
    def load() -> dict[str, Any]:
        if db is not None:
            return get_policy(db, kind)
        with ctx.session() as own:
            return get_policy(own, kind)
    return ctx.cached(f"policy:{kind}", load)


def agent_policy(ctx: ServerContext, db: Session | None, ep: Endpoint, now: datetime,
                 ip: str = "", *, site: str | None = None, subnet: str | None = None,
                 utc_offset_minutes: int | None = None) -> AgentPolicy:
    """What the endpoint must exclude, how often it centralizes, and its bandwidth: the
    rules for its site and subnet (as it reports them; else the site of its inventory
    and the address the server sees), with the caps in force at its local time."""
    upload = cached_policy(ctx, db, "upload")
    rules = cached_policy(ctx, db, "bandwidth")
    site = site or str((ep.inventory or {}).get("site", ""))
    addresses = [a for a in (subnet, ip or ep.last_ip) if a]
    local = now.astimezone(timezone(timedelta(minutes=utc_offset_minutes or 0)))
    return AgentPolicy(
        interval_seconds=int(upload.get("interval_seconds", 3600)),
        exclusions=list(upload.get("exclusions", {}).get(endpoint_family(ep), [])),
        bandwidth=bandwidth_for(rules.get("rules", []), addresses, site, local))

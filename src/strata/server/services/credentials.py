"""Enrollment and credentials: enrollment tokens (created, listed and revoked by an
administrator, used by agents), the device credential an enrollment hands out, its
rotation at check-in and its expiry, finding the device a credential belongs to, and the
admin token's rotation. Secrets are shown once; the catalog keeps only their hashes."""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

from sqlalchemy import Table, bindparam, func, or_, select
from sqlalchemy.orm import Session, configure_mappers, make_transient_to_detached

from strata.errors import Invalid, NotFound, StrataError
from strata.model.admin import TokenCreated, TokenInfo, TokenRequest
from strata.model.wire import EnrollRequest, EnrollResponse
from strata.server.auth import digest, new_secret, write_token_file
from strata.server.catalog.models import (
    Assignment,
    Cvd,
    Endpoint,
    EnrollmentToken,
    SnapshotRecord,
)
from strata.server.context import ServerContext
from strata.server.read_cache import NeedsLoad, may_load
from strata.server.services import assignments, audit, snapshots
from strata.server.services.sync import seed_holdings


class EnrollmentRefused(StrataError):
    """The enrollment token is unknown, revoked, expired or used up."""

    http_status = 401


MAX_DURATION_DAYS = 3660  # ten years: far more overflows a date


class CredentialExpired(StrataError):
    """The device credential was not renewed within its lifetime (the endpoint stayed
    away too long): the agent must enroll again."""

    http_status = 401


def parse_duration(text: str) -> timedelta:
    m = re.fullmatch(r"([0-9]{1,12})\s*([smhd])", text.strip()[:64])
    if not m:
        raise Invalid(f"not a duration: {text[:64]!r} (e.g. 30m, 24h, 7d)")
    seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if seconds > MAX_DURATION_DAYS * 86400:
        raise Invalid(f"a duration may be at most {MAX_DURATION_DAYS}d (or never)")
    return timedelta(seconds=seconds)


def create_enrollment_token(ctx: ServerContext, req: TokenRequest, *,
                            actor: str) -> TokenCreated:
    token = new_secret("senr")
    expires = datetime.now(UTC) + parse_duration(req.expires) if req.expires else None
    with ctx.write() as db:
        row = EnrollmentToken(token_hash=digest(token), uses_left=req.uses, expires_at=expires,
                              require_approval=req.require_approval, purpose=req.purpose)
        db.add(row)
        db.flush()
        tid = row.id
    audit.record(ctx, actor, "create-token", str(tid), uses=req.uses, expires=req.expires,
                 require_approval=req.require_approval, purpose=req.purpose)
    return TokenCreated(id=tid, token=token, uses=req.uses, expires_at=expires,
                        require_approval=req.require_approval, purpose=req.purpose)


def _token_status(tok: EnrollmentToken, now: datetime) -> str:
    if tok.revoked:
        return "revoked"
    if tok.expires_at is not None and tok.expires_at < now:
        return "expired"
    if tok.uses_left is not None and tok.uses_left <= 0:
        return "used up"
    return "usable"


def list_enrollment_tokens(ctx: ServerContext, *, all_tokens: bool = False) -> list[TokenInfo]:
    """Enrollment tokens, newest first: those that still enroll, or all of them."""
    now = datetime.now(UTC)
    with ctx.session() as db:
        counts = dict(db.execute(select(Endpoint.token_id, func.count()).group_by(
            Endpoint.token_id)).tuples().all())
        rows = db.scalars(select(EnrollmentToken).order_by(EnrollmentToken.id.desc())).all()
        listed = [TokenInfo(id=t.id, created_at=t.created_at, uses_left=t.uses_left,
                            expires_at=t.expires_at, require_approval=t.require_approval,
                            revoked=t.revoked, status=_token_status(t, now),
                            purpose=t.purpose or "endpoint",
                            enrolled=counts.get(t.id, 0)) for t in rows]
    return listed if all_tokens else [t for t in listed if t.status == "usable"]


def revoke_enrollment_token(ctx: ServerContext, token_id: int, *, actor: str) -> TokenInfo:
    """No endpoint enrolls with this token from now on (those it enrolled stay)."""
    with ctx.write() as db:
        tok = db.get(EnrollmentToken, token_id)
        if tok is None:
            raise NotFound(f"no enrollment token {token_id} (`strata token list --all`)")
        tok.revoked = True
    audit.record(ctx, actor, "revoke-token", str(token_id))
    return next(t for t in list_enrollment_tokens(ctx, all_tokens=True) if t.id == token_id)


def rotate_admin_token(path: Path) -> str:
    """A new admin token in `path` (0600, replaced atomically); every server process on
    that data directory re-reads it (auth.TokenFile), so the old token is refused from
    the next request, whichever process gets it."""
    token = new_secret("sadm")
    write_token_file(path, token)
    return token


def enroll(ctx: ServerContext, req: EnrollRequest, ip: str) -> EnrollResponse:
    """Exchange an enrollment token for a device credential and a new endpoint with its
    CVD (pending if the token asks for an administrator's approval)."""
    now = datetime.now(UTC)
    with ctx.write() as db:
        tok = spend_token(db, req.token, "endpoint", now)
        credential = new_secret("sdev")
        ep = Endpoint(id=str(uuid.uuid4()), hostname=req.hostname, os=req.os,
                      state="pending" if tok.require_approval else "active",
                      credential_hash=digest(credential), credential_issued_at=now,
                      inventory=req.inventory,
                      token_id=tok.id, last_seen=now, last_ip=ip)
        db.add(ep)
        db.flush()  # the CVD row references the endpoint: insert that first
        db.add(Cvd(endpoint_id=ep.id))
        state, eid = ep.state, ep.id
    audit.record(ctx, f"endpoint:{eid}", "enroll", eid, hostname=req.hostname, state=state)
    if req.previous_credential:
        _inherit_holdings(ctx, eid, req.previous_credential)
    return EnrollResponse(endpoint_id=eid, credential=credential, state=state)


def spend_token(db: Session, token: str, purpose: str, now: datetime) -> EnrollmentToken:
    """The enrollment token `token`, one use spent, if it is usable and enrolls `purpose`
    (an endpoint or a reflector); EnrollmentRefused otherwise."""
    # FOR UPDATE: another server process on the same PostgreSQL catalog waits here, so
    # a token's last use is spent once (SQLite has no row locks; its writers take turns).
    tok = db.scalar(select(EnrollmentToken).where(
        EnrollmentToken.token_hash == digest(token)).with_for_update())
    if tok is None or tok.revoked:
        raise EnrollmentRefused("unknown or revoked enrollment token")
    if (tok.purpose or "endpoint") != purpose:
        raise EnrollmentRefused(f"this enrollment token enrolls {tok.purpose}s, not "
                                f"{purpose}s")
    expires = tok.expires_at
    if expires is not None and expires < now:
        raise EnrollmentRefused("this enrollment token has expired")
    if tok.uses_left is not None:
        if tok.uses_left <= 0:
            raise EnrollmentRefused("this enrollment token has been used up")
        tok.uses_left -= 1
    return tok


def _inherit_holdings(ctx: ServerContext, eid: str, previous_credential: str) -> None:
    """A machine enrolling again shows the credential it had: the new endpoint holds what
    the old one did (docs/security.md), so it sends none of its data again. A wrong,
    expired or revoked credential counts for nothing (it reads like none given); a thief
    of a live credential could read that endpoint's data through it anyway."""
    try:
        old = device_for_credential(ctx, previous_credential)
    except StrataError:  # expired
        return
    if old is None or old.state == "revoked" or old.id == eid:
        return
    seed_holdings(ctx, old)
    ctx.holdings.inherit(eid, old.id)
    audit.record(ctx, f"endpoint:{eid}", "inherit-holdings", old.id)


def device_for_credential(ctx: ServerContext, credential: str) -> Endpoint | None:
    """The endpoint a device credential belongs to, whatever its state (cached: nearly
    every request of an agent asks; approval and revocation invalidate). The credential
    handed out before the current one still counts until the agent uses the new one.
    An expired credential is refused here, for every call (CredentialExpired)."""
    key = digest(credential)
    ep: Endpoint | None = ctx.cached_filling(f"device:{key}", lambda: _load_device(ctx, key))
    if ep is not None and ep.credential_issued_at is not None and \
            datetime.now(UTC) - ep.credential_issued_at > ctx.settings.credential_lifetime:
        raise CredentialExpired(
            "this endpoint's credential expired: it was not renewed at a check-in for "
            f"{ctx.settings.credential_lifetime.days} days; enroll it anew "
            "(`strata agent enroll --force`)")
    return ep


_ENDPOINTS, _CVDS = cast(Table, Endpoint.__table__), cast(Table, Cvd.__table__)
_SNAPSHOTS = cast(Table, SnapshotRecord.__table__)
_ASSIGNMENTS = cast(Table, Assignment.__table__)
_ENDPOINT_COLUMNS = [c.key for c in _ENDPOINTS.columns]


@functools.cache
def _endpoint_factory() -> Callable[[], Endpoint]:
    """A blank Endpoint, as the ORM's loader makes one (the mappings configured first, as
    a query or a constructor would have)."""
    configure_mappers()
    return Endpoint.__mapper__.class_manager.new_instance
# A device by its credential, with what every check-in asks next (its head, whether it has
# an assignment) in the same query: an endpoint whose entries expired or were cleared
# costs one catalog round trip and no ORM load, where it cost three sessions and loads.
_BY_CREDENTIAL = (
    select(*_ENDPOINTS.columns, _SNAPSHOTS.c.id.label("head_id"),
           _SNAPSHOTS.c.time.label("head_time"), _ASSIGNMENTS.c.endpoint_id.label("assigned"))
    .select_from(_ENDPOINTS
                 .outerjoin(_CVDS, _CVDS.c.endpoint_id == _ENDPOINTS.c.id)
                 .outerjoin(_SNAPSHOTS, _SNAPSHOTS.c.id == _CVDS.c.last_snapshot)
                 .outerjoin(_ASSIGNMENTS, _ASSIGNMENTS.c.endpoint_id == _ENDPOINTS.c.id))
    .where(or_(_ENDPOINTS.c.credential_hash == bindparam("key"),
               _ENDPOINTS.c.previous_credential_hash == bindparam("key"))))


def _load_device(ctx: ServerContext, key: str) -> tuple[Endpoint | None, dict[str, object]]:
    """The endpoint whose current or previous credential hashes to `key` (a detached
    record, as a session would have loaded it), and the cache entries of its head and,
    without an assignment, of its desired state (None)."""
    with ctx.connection() as conn:
        row = conn.execute(_BY_CREDENTIAL, {"key": key}).first()
    if row is None:
        return None, {}
    fields = row._mapping
    # Filled as the ORM's loader does (into the instance's dict, no change events), then
    # given its identity: the same detached record a session's load and expunge gave.
    ep = _endpoint_factory()()
    ep.__dict__.update((name, fields[name]) for name in _ENDPOINT_COLUMNS)
    make_transient_to_detached(ep)
    more: dict[str, object] = {snapshots.head_key(ep.id): (fields["head_id"],
                                                           fields["head_time"])}
    if fields["assigned"] is None:
        more[assignments.desired_key(ep.id)] = (None,)
    return ep, more


def renew_credential(ctx: ServerContext, ep: Endpoint, presented: str) -> str | None:
    """At a check-in: a new device credential when the one in use is due for rotation
    (or the agent never received the last one), else None. The credential the agent
    holds stays valid until it presents the new one, so a lost answer locks nobody out."""
    key = digest(presented)
    now = datetime.now(UTC)
    current = key == ep.credential_hash
    issued = ep.credential_issued_at
    due = issued is None or now - issued >= ctx.settings.credential_rotation
    if current and not due and ep.previous_credential_hash is None:
        return None  # nearly every check-in
    if not may_load():
        raise NeedsLoad("credential")  # a write: in a worker thread, not on the event loop
    if current and not due:
        with ctx.write() as db:  # the agent has the new one: the old one is done
            row = db.get(Endpoint, ep.id)
            if row is not None and row.credential_hash == key:
                row.previous_credential_hash = None
        _forget_cached(ctx, ep)
        return None
    credential = new_secret("sdev")
    with ctx.write() as db:
        row = db.get(Endpoint, ep.id)
        if row is None or key not in (row.credential_hash, row.previous_credential_hash):
            return None  # changed meanwhile (revoked, re-rotated by another request)
        row.previous_credential_hash = key  # the one the agent holds, until it uses the new
        row.credential_hash = digest(credential)
        row.credential_issued_at = now
    _forget_cached(ctx, ep, digest(credential))
    audit.record(ctx, f"endpoint:{ep.id}", "rotate-credential", ep.id)
    return credential


def _forget_cached(ctx: ServerContext, ep: Endpoint, *more: str) -> None:
    for key in (ep.credential_hash, ep.previous_credential_hash, *more):
        if key:
            ctx.uncache(f"device:{key}")

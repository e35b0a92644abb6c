"""Enrollment and credentials: enrollment tokens (created by an administrator, used by
agents), the device credential an enrollment hands out, and finding the device a
credential belongs to. Secrets are shown once; the catalog keeps only their hashes."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from strata.errors import Invalid, StrataError
from strata.model.admin import TokenCreated, TokenRequest
from strata.model.wire import EnrollRequest, EnrollResponse
from strata.server.auth import digest, new_secret
from strata.server.catalog.models import Cvd, Endpoint, EnrollmentToken
from strata.server.context import ServerContext
from strata.server.services import audit


class EnrollmentRefused(StrataError):
    """The enrollment token is unknown, revoked, expired or used up."""

    http_status = 401


MAX_DURATION_DAYS = 3660  # ten years: far more overflows a date


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
                              require_approval=req.require_approval)
        db.add(row)
        db.flush()
        tid = row.id
    audit.record(ctx, actor, "create-token", str(tid), uses=req.uses, expires=req.expires,
                 require_approval=req.require_approval)
    return TokenCreated(id=tid, token=token, uses=req.uses, expires_at=expires,
                        require_approval=req.require_approval)


def enroll(ctx: ServerContext, req: EnrollRequest, ip: str) -> EnrollResponse:
    """Exchange an enrollment token for a device credential and a new endpoint with its
    CVD (pending if the token asks for an administrator's approval)."""
    now = datetime.now(UTC)
    with ctx.write() as db:
        # FOR UPDATE: another server process on the same PostgreSQL catalog waits here, so
        # a token's last use is spent once (SQLite has no row locks; its writers take turns).
        tok = db.scalar(select(EnrollmentToken).where(
            EnrollmentToken.token_hash == digest(req.token)).with_for_update())
        if tok is None or tok.revoked:
            raise EnrollmentRefused("unknown or revoked enrollment token")
        expires = tok.expires_at
        if expires is not None and expires < now:
            raise EnrollmentRefused("this enrollment token has expired")
        if tok.uses_left is not None:
            if tok.uses_left <= 0:
                raise EnrollmentRefused("this enrollment token has been used up")
            tok.uses_left -= 1
        credential = new_secret("sdev")
        ep = Endpoint(id=str(uuid.uuid4()), hostname=req.hostname, os=req.os,
                      state="pending" if tok.require_approval else "active",
                      credential_hash=digest(credential), inventory=req.inventory,
                      token_id=tok.id, last_seen=now, last_ip=ip)
        db.add(ep)
        db.flush()  # the CVD row references the endpoint: insert that first
        db.add(Cvd(endpoint_id=ep.id))
        state, eid = ep.state, ep.id
    audit.record(ctx, f"endpoint:{eid}", "enroll", eid, hostname=req.hostname, state=state)
    return EnrollResponse(endpoint_id=eid, credential=credential, state=state)


def device_for_credential(ctx: ServerContext, credential: str) -> Endpoint | None:
    """The endpoint a device credential belongs to, whatever its state (cached: nearly
    every request of an agent asks; approval and revocation invalidate)."""
    key = digest(credential)

    def load() -> Endpoint | None:
        with ctx.session() as db:
            row = db.scalar(select(Endpoint).where(Endpoint.credential_hash == key))
            if row is not None:
                db.expunge(row)
            return row
    return ctx.cached(f"device:{key}", load)

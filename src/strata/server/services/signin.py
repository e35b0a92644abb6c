"""Signing in with a name and a password, for any kind of account (IT staff, file portal
users): the throttles, the per-account lock, and browser sessions that expire. One copy of
this logic, parameterised by the account's and the session's tables."""

from __future__ import annotations

import functools
import secrets
import threading
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select

from strata.errors import StrataError
from strata.server.auth import digest
from strata.server.context import ServerContext
from strata.server.passwords import check_password, hash_password
from strata.server.services import audit

SESSION_IDLE = timedelta(minutes=30)  # a console left alone this long signs out
SESSION_MAX = timedelta(hours=12)  # and any session ends after a working day
LOCK_AFTER = 5  # failed sign-ins in a row before an account is locked for a while
LOCK_FIRST, LOCK_MAX = timedelta(seconds=30), timedelta(minutes=15)
IP_WINDOW, IP_MAX_FAILURES = 300.0, 20  # failures one address may have in 5 minutes
TOUCH = timedelta(minutes=1)  # last_seen / last_used are written at most this often


class LoginRefused(StrataError):
    http_status = 401


class TooManyAttempts(StrataError):
    http_status = 429


class AddressThrottle:
    """Failed sign-ins per client address in a sliding window, in this process: a second
    line behind the per-account lock, against one address trying many names."""

    def __init__(self, window: float = IP_WINDOW, limit: int = IP_MAX_FAILURES):
        self.window, self.limit = window, limit
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, ip: str, now: float) -> deque[float]:
        q = self._failures.setdefault(ip, deque())
        while q and now - q[0] > self.window:
            q.popleft()
        return q

    def blocked(self, ip: str) -> bool:
        with self._lock:
            return len(self._recent(ip, time.monotonic())) >= self.limit

    def failed(self, ip: str) -> None:
        with self._lock:
            now = time.monotonic()
            self._recent(ip, now).append(now)
            if len(self._failures) > 10_000:  # bounded memory under a spray of addresses
                self._failures = {k: v for k, v in self._failures.items() if v}


@functools.cache
def _dummy_hash() -> str:
    """An unknown name costs the same hash as a known one: timing tells nothing about who
    exists. Made on first use, not at import (a hash takes a few tenths of a second)."""
    return hash_password(secrets.token_urlsafe(16))


def _lock_for(failures: int) -> timedelta:
    return min(LOCK_MAX, LOCK_FIRST * (1 << min(failures - LOCK_AFTER, 10)))


def check_sign_in(ctx: ServerContext, account: Any, name: str, password: str, ip: str,
                  throttle: AddressThrottle, who: str) -> int:
    """The id of the `account` row (a table with name, password_hash, failed_logins,
    locked_until) whose name and password these are. Refused alike for an unknown name
    and a wrong password; after LOCK_AFTER failures in a row the account is locked for a
    while (doubling up to LOCK_MAX), without the password even being checked. `who`: how
    the audit log names the one trying (e.g. "user:NAME")."""
    if throttle.blocked(ip):
        raise TooManyAttempts("too many failed sign-ins from this address: try again in a "
                              "few minutes")
    now = datetime.now(UTC)
    with ctx.session() as db:
        row = db.scalar(select(account).where(account.name == name))
        if row is not None and row.locked_until is not None and row.locked_until > now:
            raise TooManyAttempts("too many failed sign-ins for this account: try again "
                                  "in a few minutes")
        rid, encoded = (row.id, row.password_hash) if row else (None, _dummy_hash())
    if rid is not None and check_password(password, encoded):
        with ctx.write() as db:
            r = db.get(account, rid)
            if r is None:
                raise LoginRefused("unknown user name or wrong password")
            r.failed_logins, r.locked_until = 0, None
        return rid
    if rid is None:
        check_password(password, encoded)  # the same work as for a known name
    throttle.failed(ip)
    if rid is not None:
        with ctx.write() as db:
            r = db.get(account, rid)
            if r is not None:
                r.failed_logins += 1
                if r.failed_logins >= LOCK_AFTER:
                    r.locked_until = now + _lock_for(r.failed_logins)
    audit.record(ctx, who[:64], "login-failed", "", ip=ip)
    raise LoginRefused("unknown user name or wrong password")


def open_session(ctx: ServerContext, table: Any, owner: dict[str, int]) -> tuple[str, str]:
    """A new browser session in `table` for `owner` (e.g. {"user_id": 3}): the cookie's
    value and the session's CSRF token. The table keeps the cookie's SHA-256 only."""
    now = datetime.now(UTC)
    secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    with ctx.write() as db:
        db.execute(delete(table).where(table.expires_at < now))
        db.add(table(id=digest(secret), csrf=csrf, created_at=now, last_seen=now,
                     expires_at=now + SESSION_MAX, **owner))
    return secret, csrf


def live_session(ctx: ServerContext, table: Any, secret: str) -> Any | None:
    """The session row (detached) if the session is still open: not past SESSION_MAX
    since sign-in, nor idle for SESSION_IDLE; an ended one is deleted."""
    now = datetime.now(UTC)
    sid = digest(secret)
    with ctx.session() as db:
        row = db.get(table, sid)
        if row is None:
            return None
        db.expunge(row)
    if row.expires_at <= now or now - row.last_seen > SESSION_IDLE:
        end_session(ctx, table, secret)
        return None
    if now - row.last_seen > TOUCH:
        with ctx.write() as db:
            s = db.get(table, sid)
            if s is not None:
                s.last_seen = now
    return row


def end_session(ctx: ServerContext, table: Any, secret: str) -> None:
    with ctx.write() as db:
        db.execute(delete(table).where(table.id == digest(secret)))

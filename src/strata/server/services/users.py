"""IT staff accounts: users and their roles, passwords (scrypt, memory-hard), personal API
tokens, console sessions, and finding who a credential belongs to.

Secrets (tokens, session cookies) are random 256-bit values shown once; the catalog keeps
their SHA-256. Passwords are kept as scrypt hashes with their own salt and parameters, so
the parameters can be raised later without invalidating older hashes.
"""

from __future__ import annotations

import base64
import functools
import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from strata.errors import Conflict, NotFound, StrataError
from strata.model.admin import Deleted
from strata.model.roles import ROLES, Permission
from strata.model.users import (
    Caller,
    UserInfo,
    UserRequest,
    UserTokenCreated,
    UserTokenInfo,
)
from strata.server.auth import digest, new_secret
from strata.server.catalog.models import User, UserSession, UserToken
from strata.server.context import ServerContext
from strata.server.services import audit

# scrypt with N=2^15, r=8, p=3: 32 MiB and 0.2-0.5 s per hash here, one of
# OWASP's recommended settings (the same strength as N=2^17, p=1, with a quarter of the
# memory, which matters when several sign-ins arrive at once on a small server).
SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P = 15, 8, 3
SESSION_IDLE = timedelta(minutes=30)  # a console left alone this long signs out
SESSION_MAX = timedelta(hours=12)  # and any session ends after a working day
LOCK_AFTER = 5  # failed sign-ins in a row before an account is locked for a while
LOCK_FIRST, LOCK_MAX = timedelta(seconds=30), timedelta(minutes=15)
IP_WINDOW, IP_MAX_FAILURES = 300.0, 20  # failures one address may have in 5 minutes
_TOUCH = timedelta(minutes=1)  # last_seen / last_used are written at most this often
BREAK_GLASS = "admin"  # the name the bootstrap admin.token acts under


class LoginRefused(StrataError):
    http_status = 401


class TooManyAttempts(StrataError):
    http_status = 429


@dataclass(frozen=True)
class Staff:
    """Who is calling: a user, or the break-glass admin token."""

    name: str
    role: str

    @property
    def actor(self) -> str:
        """The name the audit log records."""
        return BREAK_GLASS if self.name == BREAK_GLASS else f"user:{self.name}"

    def may(self, permission: Permission) -> bool:
        return permission in ROLES.get(self.role, frozenset())

    def caller(self) -> Caller:
        return Caller(name=self.name, role=self.role,  # type: ignore[arg-type]
                      permissions=sorted(ROLES.get(self.role, frozenset())))


BREAK_GLASS_STAFF = Staff(BREAK_GLASS, "administrator")


# -- passwords -------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = Scrypt(salt=salt, length=32, n=1 << SCRYPT_LOG_N, r=SCRYPT_R,
                 p=SCRYPT_P).derive(password.encode())
    return f"scrypt${SCRYPT_LOG_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def check_password(password: str, encoded: str) -> bool:
    try:
        kind, log_n, r, p, salt, key = encoded.split("$")
        if kind != "scrypt":
            return False
        got = Scrypt(salt=_unb64(salt), length=32, n=1 << int(log_n), r=int(r),
                     p=int(p)).derive(password.encode())
    except ValueError:  # a malformed hash (or none: no console login for this user)
        return False
    return hmac.compare_digest(got, _unb64(key))


@functools.cache
def _dummy_hash() -> str:
    """An unknown name costs the same hash as a known one: timing tells nothing about who
    exists. Made on first use, not at import (a hash takes a few tenths of a second)."""
    return hash_password(secrets.token_urlsafe(16))


# -- accounts --------------------------------------------------------------------------------


def _user(db: Session, name: str) -> User:
    row = db.scalar(select(User).where(User.name == name))
    if row is None:
        raise NotFound(f"no user {name!r}")
    return row


def _info(db: Session, u: User) -> UserInfo:
    tokens = db.scalar(select(func.count()).select_from(UserToken).where(
        UserToken.user_id == u.id, UserToken.revoked.is_(False))) or 0
    return UserInfo(name=u.name, role=u.role, created_at=u.created_at,  # type: ignore[arg-type]
                    tokens=tokens)


def create_user(ctx: ServerContext, req: UserRequest, *, actor: str) -> UserInfo:
    if req.name == BREAK_GLASS:
        raise Conflict(f"{BREAK_GLASS!r} is the name of the break-glass admin token")
    hashed = hash_password(req.password)  # before the write lock: it takes a while
    try:
        with ctx.write() as db:
            row = User(name=req.name, role=req.role, password_hash=hashed)
            db.add(row)
            db.flush()
            info = _info(db, row)
    except IntegrityError:
        raise Conflict(f"user {req.name!r} exists already") from None
    audit.record(ctx, actor, "create-user", req.name, role=req.role)
    return info


def list_users(ctx: ServerContext) -> list[UserInfo]:
    with ctx.session() as db:
        return [_info(db, u) for u in db.scalars(select(User).order_by(User.name))]


def delete_user(ctx: ServerContext, name: str, *, actor: str) -> Deleted:
    with ctx.write() as db:
        row = _user(db, name)
        db.execute(delete(UserSession).where(UserSession.user_id == row.id))
        db.execute(delete(UserToken).where(UserToken.user_id == row.id))
        db.delete(row)
    ctx.invalidate()
    audit.record(ctx, actor, "delete-user", name)
    return Deleted(deleted=name)


def set_password(ctx: ServerContext, name: str, password: str, *, actor: str) -> UserInfo:
    """A new password; the user's console sessions end (their API tokens stay)."""
    hashed = hash_password(password)
    with ctx.write() as db:
        row = _user(db, name)
        row.password_hash, row.failed_logins, row.locked_until = hashed, 0, None
        db.execute(delete(UserSession).where(UserSession.user_id == row.id))
        info = _info(db, row)
    audit.record(ctx, actor, "set-password", name)
    return info


def change_own_password(ctx: ServerContext, name: str, current: str, new: str) -> None:
    """A user's own change: the current password first (a session left open on someone
    else's screen is not enough); the user's other sessions end, this one too."""
    with ctx.session() as db:
        encoded = _user(db, name).password_hash
    if not check_password(current, encoded):
        audit.record(ctx, f"user:{name}", "change-password-refused", name)
        raise LoginRefused("the current password is wrong")
    set_password(ctx, name, new, actor=f"user:{name}")


# -- personal API tokens ---------------------------------------------------------------------


def create_token(ctx: ServerContext, name: str, label: str, *,
                 actor: str) -> UserTokenCreated:
    token = new_secret("susr")
    with ctx.write() as db:
        row = UserToken(user_id=_user(db, name).id, token_hash=digest(token), label=label)
        db.add(row)
        db.flush()
        tid = row.id
    audit.record(ctx, actor, "create-user-token", name, id=tid, label=label)
    return UserTokenCreated(id=tid, user=name, label=label, token=token)


def list_tokens(ctx: ServerContext, name: str) -> list[UserTokenInfo]:
    with ctx.session() as db:
        uid = _user(db, name).id
        rows = db.scalars(select(UserToken).where(UserToken.user_id == uid)
                          .order_by(UserToken.id))
        return [UserTokenInfo(id=t.id, label=t.label, created_at=t.created_at,
                              last_used=t.last_used, revoked=t.revoked) for t in rows]


def revoke_token(ctx: ServerContext, name: str, token_id: int, *,
                 actor: str) -> UserTokenInfo:
    with ctx.write() as db:
        uid = _user(db, name).id
        row = db.get(UserToken, token_id)
        if row is None or row.user_id != uid:
            raise NotFound(f"user {name!r} has no token {token_id}")
        row.revoked = True
        info = UserTokenInfo(id=row.id, label=row.label, created_at=row.created_at,
                             last_used=row.last_used, revoked=True)
    ctx.invalidate()
    audit.record(ctx, actor, "revoke-user-token", name, id=token_id)
    return info


def staff_for_token(ctx: ServerContext, token: str) -> Staff | None:
    """The user a personal API token belongs to, if it is one and not revoked."""
    now = datetime.now(UTC)
    with ctx.session() as db:
        row = db.execute(select(UserToken, User).join(User, User.id == UserToken.user_id)
                         .where(UserToken.token_hash == digest(token))).first()
        if row is None or row[0].revoked:
            return None
        tok, user = row
        staff, stale = Staff(user.name, user.role), (tok.last_used is None
                                                     or now - tok.last_used > _TOUCH)
        tid = tok.id
    if stale:
        with ctx.write() as db:
            t = db.get(UserToken, tid)
            if t is not None:
                t.last_used = now
    return staff


# -- console sign-in and sessions ------------------------------------------------------------


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


@dataclass(frozen=True)
class SignedIn:
    staff: Staff
    session: str  # the cookie's value (shown once: the catalog keeps its hash)
    csrf: str


def _lock_for(failures: int) -> timedelta:
    return min(LOCK_MAX, LOCK_FIRST * (1 << min(failures - LOCK_AFTER, 10)))


def login(ctx: ServerContext, name: str, password: str, ip: str,
          throttle: AddressThrottle) -> SignedIn:
    """Check a user's password and open a console session. Refused alike for an unknown
    name and a wrong password; after LOCK_AFTER failures in a row the account is locked
    for a while (doubling up to LOCK_MAX), without the password even being checked."""
    if throttle.blocked(ip):
        raise TooManyAttempts("too many failed sign-ins from this address: try again in a "
                              "few minutes")
    now = datetime.now(UTC)
    with ctx.session() as db:
        user = db.scalar(select(User).where(User.name == name))
        if user is not None and user.locked_until is not None and user.locked_until > now:
            raise TooManyAttempts("too many failed sign-ins for this account: try again "
                                  "in a few minutes")
        uid, encoded = (user.id, user.password_hash) if user else (None, _dummy_hash())
    ok = check_password(password, encoded) and uid is not None
    if not ok:
        throttle.failed(ip)
        if uid is not None:
            with ctx.write() as db:
                u = db.get(User, uid)
                if u is not None:
                    u.failed_logins += 1
                    if u.failed_logins >= LOCK_AFTER:
                        u.locked_until = now + _lock_for(u.failed_logins)
        audit.record(ctx, f"user:{name}"[:64], "login-failed", "", ip=ip)
        raise LoginRefused("unknown user name or wrong password")
    secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    with ctx.write() as db:
        u = db.get(User, uid)
        if u is None:
            raise LoginRefused("unknown user name or wrong password")
        u.failed_logins, u.locked_until = 0, None
        db.execute(delete(UserSession).where(UserSession.expires_at < now))
        db.add(UserSession(id=digest(secret), user_id=u.id, csrf=csrf, created_at=now,
                           last_seen=now, expires_at=now + SESSION_MAX))
        staff = Staff(u.name, u.role)
    audit.record(ctx, staff.actor, "login", "", ip=ip)
    return SignedIn(staff, secret, csrf)


def session_staff(ctx: ServerContext, secret: str) -> tuple[Staff, str] | None:
    """The user of a console session and its CSRF token, if the session is still open:
    not past SESSION_MAX since sign-in, nor idle for SESSION_IDLE."""
    now = datetime.now(UTC)
    sid = digest(secret)
    with ctx.session() as db:
        row = db.execute(select(UserSession, User).join(User, User.id == UserSession.user_id)
                         .where(UserSession.id == sid)).first()
        if row is None:
            return None
        sess, user = row
        if sess.expires_at <= now or now - sess.last_seen > SESSION_IDLE:
            alive = False
        else:
            alive, stale = True, now - sess.last_seen > _TOUCH
            found = Staff(user.name, user.role), sess.csrf
    if not alive:
        logout(ctx, secret)
        return None
    if stale:
        with ctx.write() as db:
            s = db.get(UserSession, sid)
            if s is not None:
                s.last_seen = now
    return found


def logout(ctx: ServerContext, secret: str) -> None:
    with ctx.write() as db:
        db.execute(delete(UserSession).where(UserSession.id == digest(secret)))

"""IT staff accounts: users and their roles, passwords (server/passwords.py), personal API
tokens, console sessions (services/signin.py), and finding who a credential belongs to.

Secrets (tokens, session cookies) are random 256-bit values shown once; the catalog keeps
their SHA-256.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from strata.errors import Conflict, NotFound
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
from strata.server.passwords import check_password, hash_password
from strata.server.services import audit
from strata.server.services.signin import (
    TOUCH,
    AddressThrottle,
    LoginRefused,
    check_sign_in,
    end_session,
    live_session,
    open_session,
)

BREAK_GLASS = "admin"  # the name the bootstrap admin.token acts under


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


def set_role(ctx: ServerContext, name: str, role: str, *, actor: str) -> UserInfo:
    """A new role, in force from the user's next request (sessions and tokens stay)."""
    with ctx.write() as db:
        row = _user(db, name)
        before, row.role = row.role, role
        info = _info(db, row)
    audit.record(ctx, actor, "set-role", name, role=role, was=before)
    return info


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
                                                     or now - tok.last_used > TOUCH)
        tid = tok.id
    if stale:
        with ctx.write() as db:
            t = db.get(UserToken, tid)
            if t is not None:
                t.last_used = now
    return staff


# -- console sign-in and sessions ------------------------------------------------------------


@dataclass(frozen=True)
class SignedIn:
    staff: Staff
    session: str  # the cookie's value (shown once: the catalog keeps its hash)
    csrf: str


def login(ctx: ServerContext, name: str, password: str, ip: str,
          throttle: AddressThrottle) -> SignedIn:
    """Check a user's password (services/signin.py: throttles, lock) and open a console
    session."""
    uid = check_sign_in(ctx, User, name, password, ip, throttle, who=f"user:{name}")
    secret, csrf = open_session(ctx, UserSession, {"user_id": uid})
    with ctx.session() as db:
        u = db.get(User, uid)
        if u is None:
            raise LoginRefused("unknown user name or wrong password")
        staff = Staff(u.name, u.role)
    audit.record(ctx, staff.actor, "login", "", ip=ip)
    return SignedIn(staff, secret, csrf)


def session_staff(ctx: ServerContext, secret: str) -> tuple[Staff, str] | None:
    """The user of a console session and its CSRF token, if the session is still open."""
    sess = live_session(ctx, UserSession, secret)
    if sess is None:
        return None
    with ctx.session() as db:
        user = db.get(User, sess.user_id)
        return (Staff(user.name, user.role), sess.csrf) if user else None


def logout(ctx: ServerContext, secret: str) -> None:
    end_session(ctx, UserSession, secret)

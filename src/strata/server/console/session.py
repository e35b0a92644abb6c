"""Who is using the console: the session cookie, its CSRF token, and each page's
permission. Pages are refused (403) to roles that may not use them, as the admin API's
routes are, with the same permissions (model/roles.py).

The cookie is HttpOnly, SameSite=Strict, and Secure whenever the server speaks TLS. Every
form that changes something carries the session's CSRF token (htmx sends it as a header);
the sign-in form, before any session, uses a double-submit cookie. A request whose Origin
names another site is refused as well.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from strata.model.roles import Permission
from strata.server.services import users
from strata.server.services.users import Staff

SESSION_COOKIE = "strata_session"
LOGIN_COOKIE = "strata_login"  # the sign-in form's CSRF value (double submit)
CSRF_HEADER = "X-CSRF-Token"


class SignInNeeded(Exception):
    """No session, or it has ended: the page answers with the sign-in page."""


class PageForbidden(Exception):
    def __init__(self, visitor: Visitor, permission: Permission):
        super().__init__(permission.value)
        self.visitor, self.permission = visitor, permission


class CsrfRefused(Exception):
    """A form without the session's CSRF token, or from another site."""


@dataclass(frozen=True)
class Visitor:
    staff: Staff
    csrf: str

    def may(self, permission: Permission | str) -> bool:
        return self.staff.may(Permission(permission))


def is_https(request: Request) -> bool:
    return request.url.scheme == "https"


def set_cookie(response: Response, request: Request, name: str, value: str,
               max_age: int | None = None) -> None:
    response.set_cookie(name, value, max_age=max_age, httponly=True, samesite="strict",
                        secure=is_https(request), path="/")


def visitor(request: Request) -> Visitor:
    """The signed-in user (FastAPI dependency: runs in the thread pool, it reads the
    catalog)."""
    secret = request.cookies.get(SESSION_COOKIE, "")
    found = users.session_staff(request.app.state.ctx, secret) if secret else None
    if found is None:
        raise SignInNeeded()
    staff, csrf = found
    return Visitor(staff, csrf)


class Page:
    """A dependency: the visitor, who must hold `permission` for this page."""

    def __init__(self, permission: Permission):
        self.permission = permission

    async def __call__(self, request: Request) -> Visitor:
        v = await run_in_threadpool(visitor, request)
        if not v.staff.may(self.permission):
            raise PageForbidden(v, self.permission)
        return v


def same_origin(request: Request) -> bool:
    """Browsers send Origin on every POST; when present it must be this server."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return origin == f"{request.url.scheme}://{request.url.netloc}"


def check_csrf(request: Request, expected: str, submitted: str) -> None:
    token = submitted or request.headers.get(CSRF_HEADER, "")
    if not (same_origin(request) and token and expected
            and hmac.compare_digest(token.encode(), expected.encode())):
        raise CsrfRefused()


def new_login_token() -> str:
    return secrets.token_urlsafe(24)

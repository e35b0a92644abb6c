"""What every console page shares: the menu, and rendering a page for a signed-in user
with the menu their role may see."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import RedirectResponse, Response

from strata.model.roles import Permission
from strata.server.console.render import render, secure
from strata.server.console.session import Visitor

# The menu: each entry shown only to the roles whose permission it needs.
NAV = [("/", "Dashboard", Permission.VIEW), ("/endpoints", "Endpoints", Permission.VIEW),
       ("/tasks", "Tasks", Permission.VIEW), ("/compliance", "Compliance", Permission.VIEW),
       ("/layers", "Layers", Permission.LAYERS),
       ("/collections", "Collections", Permission.COLLECTIONS),
       ("/policies", "Policies", Permission.PROTECTION),
       ("/users", "Users", Permission.USERS), ("/audit", "Audit log", Permission.AUDIT)]


def page(request: Request, template: str, v: Visitor, status: int = 200,
         **context: object) -> Response:
    nav = [(href, label) for href, label, perm in NAV if v.may(perm)]
    return render(request, template, status, visitor=v, nav=nav, **context)


def see_other(url: str) -> Response:
    return secure(RedirectResponse(url, status_code=303))

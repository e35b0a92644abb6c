"""What every console page shares: the menu, and rendering a page for a signed-in user
with the menu their role may see."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import RedirectResponse, Response

from strata.model.roles import Permission
from strata.server.console.csv_tables import table_rows, with_csv_links
from strata.server.console.render import csv_response, render, render_html, secure
from strata.server.console.session import Visitor

# The menu: each entry shown only to the roles whose permission it needs.
NAV = [("/", "Dashboard", Permission.VIEW), ("/endpoints", "Endpoints", Permission.VIEW),
       ("/tasks", "Tasks", Permission.VIEW), ("/compliance", "Compliance", Permission.VIEW),
       ("/reports/software", "Software", Permission.VIEW),
       ("/reports/storage", "Storage", Permission.VIEW),
       ("/layers", "Layers", Permission.LAYERS),
       ("/collections", "Collections", Permission.COLLECTIONS),
       ("/policies", "Policies", Permission.PROTECTION),
       ("/users", "Users", Permission.USERS), ("/audit", "Audit log", Permission.AUDIT)]


OWN_EXPORT = 'data-testid="csv"'


def page(request: Request, template: str, v: Visitor, status: int = 200,
         **context: object) -> Response:
    """A signed-in user's page. Every table on it gets a CSV link, and `?format=csv&
    table=N` answers that table as CSV (console/csv_tables.py)."""
    nav = [(href, label) for href, label, perm in NAV if v.may(perm)]
    resp = render(request, template, status, visitor=v, nav=nav, **context)
    if request.method != "GET" or status != 200:
        return resp
    html = bytes(resp.body).decode()
    if request.query_params.get("format") == "csv":
        index = request.query_params.get("table", "0")
        rows = table_rows(html, int(index) if index.isdigit() else -1)
        if rows is None:
            return render(request, "message.html", 404, visitor=v, nav=nav, title="CSV",
                          message="this page has no such table")
        name = request.url.path.strip("/").replace("/", "-") or "dashboard"
        return csv_response(f"{name}-{index}", rows[0], rows[1:])
    if OWN_EXPORT in html:  # the page offers its own (fuller) export of its table
        return resp
    return render_html(resp, with_csv_links(request, html))


def see_other(url: str) -> Response:
    return secure(RedirectResponse(url, status_code=303))

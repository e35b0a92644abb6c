"""Rendering console pages: one Jinja2 environment that always escapes (every string from
an endpoint is hostile: a hostname may be `<script>`), and the security headers every
page carries (a content security policy that allows only this server's own scripts and
styles, no framing, no caching of pages)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from strata import __version__
from strata.model.csv_table import csv_text
from strata.model.units import human_bytes

HERE = Path(__file__).parent
STATIC = HERE / "static"
# No inline script or style anywhere (htmx's own indicator style is turned off in
# base.html): a string that slipped through escaping still could not run.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "never"


def _shown(value: object) -> str:
    """A value an agent reported: text as it is, anything else as JSON (not Python's
    repr). Escaped by the template like everything else."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _ratio(value: float) -> str:
    return f"{value:.2f}×" if value else "–"


ENV = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True,
                  undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
ENV.filters.update(when=_when, size=human_bytes, ratio=_ratio, shown=_shown)
ENV.globals.update(version=__version__)


def secure(response: Response) -> Response:
    response.headers.update(PAGE_HEADERS)
    return response


def csv_response(name: str, header: Sequence[str],
                 rows: Iterable[Sequence[object]]) -> Response:
    """A table as a CSV download (model/csv_table.py: formulas kept as text)."""
    return secure(Response(csv_text(header, rows).encode(), media_type="text/csv; charset=utf-8",
                           headers={"Content-Disposition": f'attachment; filename="{name}.csv"'}))


def render_html(page: HTMLResponse, html: str) -> HTMLResponse:
    """The same response (status, headers) with its HTML replaced."""
    out = HTMLResponse(html, status_code=page.status_code)
    for key, value in page.headers.items():
        if key.lower() not in ("content-length", "content-type"):
            out.headers[key] = value
    return out


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = ENV.get_template(template).render(request=request, **context)
    page = HTMLResponse(html, status_code=status)
    if request.url.scheme == "https":  # a browser that saw TLS here never falls back
        page.headers["Strict-Transport-Security"] = "max-age=31536000"
    return secure(page)  # type: ignore[return-value]

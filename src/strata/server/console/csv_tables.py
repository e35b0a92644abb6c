"""CSV export of every table of every console page, with one mechanism: each `<table>` a
page renders gets a "CSV" link (`?format=csv&table=N`, the page's own query kept), and
that request renders the same page and returns table N's cells as CSV. Pages with
richer exports of their own (endpoints, audit log, tasks: full ids, ISO times) answer
`format=csv` before they render and never get here."""

from __future__ import annotations

import re
from html import escape
from html.parser import HTMLParser
from urllib.parse import urlencode

from fastapi import Request

_TABLE = re.compile(r"<table\b")


class _Tables(HTMLParser):
    """The text of each cell of each table, by table, row and cell."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[list[list[str]]] = []
        self._depth = 0
        self._cell: list[str] | None = None
        self._skip = 0  # inside <form>, <script>, <style>, <select>: buttons are not data

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._depth += 1
            if self._depth == 1:
                self.tables.append([])
        elif self._depth == 1 and tag == "tr":
            self.tables[-1].append([])
        elif self._depth == 1 and tag in ("td", "th") and self.tables[-1]:
            self._cell = []
        elif tag in ("form", "script", "style", "select"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._depth -= 1
        elif tag in ("td", "th") and self._cell is not None and self._depth == 1:
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag in ("form", "script", "style", "select"):
            self._skip = max(0, self._skip - 1)

    def handle_data(self, data: str) -> None:
        if self._cell is not None and not self._skip:
            self._cell.append(data)


def table_rows(html: str, index: int) -> list[list[str]] | None:
    """Table `index` (0-based, in page order) of a rendered page; None if there is none."""
    parser = _Tables()
    parser.feed(html[max(html.find("<main"), 0):])  # the tables the links were put on
    parser.close()
    if not 0 <= index < len(parser.tables):
        return None
    return [row for row in parser.tables[index] if row]


def with_csv_links(request: Request, html: str) -> str:
    """A "CSV" link before each table of the page's main content."""
    query = [(k, v) for k, v in request.query_params.multi_items()
             if k not in ("format", "table")]
    count = iter(range(1 << 30))

    def link(_m: re.Match[str]) -> str:
        href = "?" + urlencode([*query, ("format", "csv"), ("table", str(next(count)))])
        return (f'<p class="csv"><a href="{escape(href)}" data-testid="csv-link">CSV</a></p>'
                "<table")

    main_at = html.find("<main")
    if main_at < 0:
        return html
    return html[:main_at] + _TABLE.sub(link, html[main_at:])

"""Tables as CSV, the same from the console (`?format=csv`) and the CLI (`--csv`): UTF-8,
one header line, times in ISO 8601 UTC, and text a spreadsheet would run as a formula (a
hostname like `=HYPERLINK(...)` from a hostile endpoint) kept as text with a leading
quote."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from datetime import datetime

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> str:
    text = "" if value is None else (value.strftime("%Y-%m-%dT%H:%M:%SZ")
                                     if isinstance(value, datetime) else str(value))
    return "'" + text if text.startswith(FORMULA_START) else text


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(header)
    w.writerows([csv_cell(v) for v in row] for row in rows)
    return out.getvalue()

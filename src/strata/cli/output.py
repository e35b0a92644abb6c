"""Printing for the CLI: Rich for people, JSON for machines, and progress bars on a TTY.

Much of what the CLI prints comes from endpoints (hostnames, OS names, paths, triggers) or
from the server, and is hostile until shown otherwise: a hostname `laptop-[/]` must not
crash a table as Rich markup, and `\x1b[2J` must not reach the admin's terminal. So both
consoles take text literally (markup and emoji codes off: a command that wants colour
passes `markup=True` and puts every value through `safe`), and strip control characters
from whatever they render (`SafeConsole`), tables and progress bars included.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

from rich.console import Console, ConsoleOptions, RenderableType
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.segment import Segment
from rich.text import Text

from strata.engine.progress import Progress as EngineProgress
from strata.model.units import human_bytes  # noqa: F401  (the CLI's modules import it here)

T = TypeVar("T")
# C0 controls but tab and newline (which Rich lays out itself), DEL, C1 controls (a lone
# 0x9b is CSI on some terminals), and the bidirectional overrides that reorder a line.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# In one value (`clean`), a newline or tab would forge a row or a column: replaced too.
_UNSAFE_IN_VALUE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean(value: object) -> str:
    """One value from an endpoint or the server, fit for a terminal: every control
    character (newlines too) shown as `?`."""
    return _UNSAFE_IN_VALUE.sub("?", str(value))


def safe(value: object) -> str:
    """`clean`, and escaped for Rich markup: for values put into a `markup=True` string."""
    return escape(clean(value))


class SafeConsole(Console):
    """A console that never writes a control character it was given as text: every
    segment rendered (tables and nested renderables go through here too) is cleaned.
    Rich's own control output (cursor moves of a progress bar) is a separate kind of
    segment, and its colours are added after rendering, so both stay intact."""

    def render_str(self, text: str, **kwargs: Any) -> Text:
        # Cleaned before Rich measures it, so that table columns stay aligned.
        return super().render_str(_UNSAFE.sub("?", text), **kwargs)

    def render(self, renderable: RenderableType,
               options: ConsoleOptions | None = None) -> Iterator[Segment]:
        for segment in super().render(renderable, options):
            if segment.control is None and _UNSAFE.search(segment.text):
                yield Segment(_UNSAFE.sub("?", segment.text), segment.style)
            else:
                yield segment


class CleanLogFormatter(logging.Formatter):
    """The server's log lines name paths and hosts that clients chose: an escape sequence
    in a URL must not reach the terminal `strata server` runs in."""

    def format(self, record: logging.LogRecord) -> str:
        return _UNSAFE.sub("?", super().format(record))


def log_to_stderr(logger_name: str = "strata") -> None:
    """Warnings and errors of `logger_name` as clean lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(CleanLogFormatter("%(levelname)s: %(message)s"))
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False


# soft_wrap: never fold long paths or messages when output goes to a pipe or a file.
# Piped, there is no width to fit: a table keeps every id and path whole (Rich would
# assume 80 columns and cut them with an ellipsis).
_PIPE_WIDTH = 10_000
console = SafeConsole(soft_wrap=True, markup=False, emoji=False,
                      width=None if sys.stdout.isatty() else _PIPE_WIDTH)
err_console = SafeConsole(stderr=True, soft_wrap=True, markup=False, emoji=False)


def print_error(message: str) -> None:
    """One line on stderr, whatever its length, so scripts can read it."""
    err_console.print(f"[red]error:[/] {safe(' '.join(message.split()))}", markup=True,
                      highlight=False, soft_wrap=True)


def iso_time(when: datetime | str | float | None) -> str:
    """One timestamp format everywhere: ISO 8601 in UTC to the second, `2026-12-02T10:03:00Z`
    (a naive time is taken as UTC, as the catalog stores it; a number is epoch seconds)."""
    if when is None or when == "":
        return ""
    if isinstance(when, int | float):
        moment = datetime.fromtimestamp(when, UTC)
    elif isinstance(when, str):
        try:
            moment = datetime.fromisoformat(when.replace("Z", "+00:00"))
        except ValueError:
            return when
    else:
        moment = when
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return str(value)


_UTC_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00")


def _one_time_format(doc: object) -> object:
    """Timestamps in UTC written `…Z` whoever made them (the API's models write `Z`,
    Python's isoformat `+00:00`): one format in every JSON document the CLI prints."""
    if isinstance(doc, dict):
        return {k: _one_time_format(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_one_time_format(v) for v in doc]
    if isinstance(doc, str) and _UTC_ISO.fullmatch(doc):
        return doc[:-6] + "Z"
    return doc


def print_json(doc: object) -> None:
    sys.stdout.write(json.dumps(_one_time_format(doc), indent=2, default=_json_default)
                     + "\n")


def plural(n: int, word: str) -> str:
    """`1 snapshot`, `3 snapshots`."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def show_progress() -> bool:
    return sys.stderr.isatty() and not os.environ.get("STRATA_NO_PROGRESS")


def count_tree(root: str, progress: EngineProgress) -> None:
    """Fill in totals so the bar can show an ETA (runs beside the real work)."""
    files = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            files += 1
            size += st.st_size
    progress.total_files, progress.total_bytes = files, size


def restore_totals(source: object, snap: object, paths: list[str],
                   progress: EngineProgress) -> None:
    """What a restore of `paths` writes, for the bar's ETA (beside the restore)."""
    import contextlib

    from strata.engine.restore import select_entries
    from strata.model.entry import EntryType

    files = size = 0
    with contextlib.suppress(Exception):  # only an estimate: the restore says what failed
        for e in select_entries(source, snap, paths):  # type: ignore[arg-type]
            if e.type is EntryType.FILE:
                files += 1
                size += e.size
        progress.total_files, progress.total_bytes = files, size


def run_with_progress(label: str, work: Callable[[EngineProgress], T],
                      counter: Callable[[EngineProgress], None] | None = None,
                      json_mode: bool = False) -> T:
    """Run `work` in a thread while a Rich bar follows its counters (TTY only)."""
    prog = EngineProgress()
    if json_mode or not show_progress():
        return work(prog)
    prog.watched = True
    if counter:
        threading.Thread(target=counter, args=(prog,), daemon=True).start()
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = work(prog)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.fields[files]} files"), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(label, total=None, files=0)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            bar.update(task, description=prog.phase or label,
                       completed=prog.bytes_done, total=prog.total_bytes,
                       files=f"{prog.files_done}" + (f"/{prog.total_files}"
                                                      if prog.total_files else ""))
    if "error" in box:
        raise box["error"]
    return box["result"]

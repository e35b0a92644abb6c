"""Printing for the CLI: Rich for people, JSON for machines, and progress bars on a TTY."""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from strata.engine.progress import Progress as EngineProgress
from strata.model.units import human_bytes  # noqa: F401  (the CLI's modules import it here)

T = TypeVar("T")
# soft_wrap: never fold long paths or messages when output goes to a pipe or a file.
# Piped, there is no width to fit: a table keeps every id and path whole (Rich would
# assume 80 columns and cut them with an ellipsis).
_PIPE_WIDTH = 10_000
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else _PIPE_WIDTH)
err_console = Console(stderr=True, soft_wrap=True)


def print_error(message: str) -> None:
    """One line on stderr, whatever its length, so scripts can read it."""
    err_console.print(f"[red]error:[/] {escape(' '.join(message.split()))}",
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


def print_json(doc: object) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=_json_default) + "\n")


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


def run_with_progress(label: str, work: Callable[[EngineProgress], T],
                      counter: Callable[[EngineProgress], None] | None = None,
                      json_mode: bool = False) -> T:
    """Run `work` in a thread while a Rich bar follows its counters (TTY only)."""
    prog = EngineProgress()
    if json_mode or not show_progress():
        return work(prog)
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
            bar.update(task, completed=prog.bytes_done, total=prog.total_bytes,
                       files=f"{prog.files_done}" + (f"/{prog.total_files}"
                                                      if prog.total_files else ""))
    if "error" in box:
        raise box["error"]
    return box["result"]

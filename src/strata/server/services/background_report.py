"""A report too costly for a page load (storage per CVD walks every snapshot's manifest;
the fleet's software summary groups every package row): computed in a background thread
at most every `max_age` seconds, while readers get the last result at once. Each server
process keeps and computes its own (several processes behind a load balancer each pay
for it once per `max_age`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Generic, TypeVar

from strata.errors import StrataError

T = TypeVar("T")
log = logging.getLogger("strata.server")


class ReportFailed(StrataError):
    http_status = 500


class BackgroundReport(Generic[T]):
    def __init__(self, name: str, compute: Callable[[], T], max_age: float,
                 clock: Callable[[], float] = time.monotonic):
        self.name, self.compute, self.max_age, self.clock = name, compute, max_age, clock
        self._lock = threading.Lock()
        self._value: T | None = None
        self._at: float | None = None  # clock() when the value was computed
        self.computed_at: datetime | None = None
        self._error = ""
        self._running: threading.Event | None = None

    def get(self, *, wait: bool = False) -> T | None:
        """The last result (None before the first); a stale one starts a new computation.
        `wait`: block until there is a result (the CLI; a page never waits)."""
        with self._lock:
            stale = self._at is None or self.clock() - self._at > self.max_age
            running = self._running
            if stale and running is None:
                running = self._running = threading.Event()
                threading.Thread(target=self._run, args=(running,), daemon=True,
                                 name=f"report-{self.name}").start()
            value = self._value
        if value is None and wait:
            if running is not None:
                running.wait()
            with self._lock:
                value, error = self._value, self._error
            if value is None:
                raise ReportFailed(f"the {self.name} report failed: {error}")
        return value

    def _run(self, done: threading.Event) -> None:
        try:
            value = self.compute()
            with self._lock:
                self._value, self._at = value, self.clock()
                self.computed_at, self._error = datetime.now(UTC), ""
        except Exception as exc:  # kept for the next reader; the old value stays served
            log.exception("the %s report failed", self.name)
            with self._lock:
                self._error = str(exc) or type(exc).__name__
                self._at = self.clock()  # not again at once: at most every max_age
        finally:
            with self._lock:
                self._running = None
            done.set()


_REPORTS_LOCK = threading.Lock()
_ATTRIBUTE = "_background_reports"


def report_for(owner: object, name: str, compute: Callable[[], T],
               max_age: float) -> BackgroundReport[T]:
    """One report of each name per server context (`owner`), kept on it: it lives and
    dies with that server."""
    with _REPORTS_LOCK:
        reports: dict[str, BackgroundReport] = getattr(owner, _ATTRIBUTE, None) or {}
        setattr(owner, _ATTRIBUTE, reports)
        if name not in reports:
            reports[name] = BackgroundReport(name, compute, max_age)
        return reports[name]

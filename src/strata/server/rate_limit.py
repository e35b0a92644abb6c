"""Per-endpoint limits: a token bucket on how many chunk ids an endpoint may ask about,
and a cap on its uploads in flight. Both are in-process (each server process counts its
own requests), which bounds what one endpoint costs one process."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from strata.errors import StrataError

REPORT_SECONDS = 600.0  # a key refused again within this is not reported again


class TooManyRequests(StrataError):
    """The endpoint asks faster than its limit: it waits and retries."""

    http_status = 429

    def __init__(self, message: str, retry_after: float, first: bool = True):
        self.retry_after = max(1, int(retry_after + 0.999))
        self.first = first  # the first refusal of this key in a while: worth an audit entry
        super().__init__(message)


class RateLimiter:
    """`rate` units a second per key, with bursts of up to `burst`."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._refused: dict[str, float] = {}  # key -> when it was last refused
        self._lock = threading.Lock()

    def take(self, key: str, amount: float, what: str) -> None:
        """Spend `amount`, or raise TooManyRequests (spending nothing)."""
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if amount > tokens:
                self._buckets[key] = (tokens, now)
                first = now - self._refused.get(key, -REPORT_SECONDS) >= REPORT_SECONDS
                self._refused[key] = now
                if len(self._refused) > 100_000:
                    self._refused.clear()
                raise TooManyRequests(f"too many {what}: slow down",
                                      (amount - tokens) / self.rate, first)
            self._buckets[key] = (tokens - amount, now)
            if len(self._buckets) > 100_000:  # forget full buckets (idle endpoints)
                self._buckets = {k: v for k, v in self._buckets.items()
                                 if v[0] + (now - v[1]) * self.rate < self.burst}


class ConcurrencyLimit:
    """At most `limit` requests of one key at once; the next one is refused, not queued
    (a queued upload would hold its body in memory while it waits)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._active: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def slot(self, key: str, what: str) -> Iterator[None]:
        with self._lock:
            n = self._active.get(key, 0)
            if n >= self.limit:
                raise TooManyRequests(f"at most {self.limit} {what} at once per endpoint", 1)
            self._active[key] = n + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._active[key] - 1
                if left:
                    self._active[key] = left
                else:
                    del self._active[key]

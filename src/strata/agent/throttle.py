"""Bandwidth limiting: a token bucket that makes transfers wait to stay under a rate."""

from __future__ import annotations

import threading
import time


class TokenBucket:
    """Allows `rate` bytes per second on average, with bursts of up to one second."""

    def __init__(self, rate: float | None):
        self.rate = rate
        self._tokens = rate or 0.0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def consume(self, nbytes: int) -> float:
        """Block until `nbytes` may pass; return the seconds waited."""
        if not self.rate:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= nbytes
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait:
            time.sleep(wait)
        return wait


def parse_rate(text: str | None) -> float | None:
    """'512K', '2M', '100000' (bytes/s) or 'KB/s' style suffixes -> bytes per second."""
    if not text:
        return None
    t = text.strip().upper().removesuffix("/S").removesuffix("B").removesuffix("I")
    mult = {"K": 1024, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in "KMG" else t
    try:
        value = float(number) * mult
    except ValueError:
        raise ValueError(f"not a rate: {text!r} (e.g. 512K or 2M bytes per second)") from None
    if value <= 0:
        raise ValueError(f"rate must be positive: {text!r}")
    return value

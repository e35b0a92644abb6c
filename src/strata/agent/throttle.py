"""Bandwidth limiting: a token bucket that the byte stream itself passes through, in small
pieces, so that a cap holds over every second and not only on average (a whole batch at
line speed, then a long wait, keeps the average and floods the link)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

BURST_SECONDS = 0.02  # the most the bucket holds: 2% of a second's worth
MIN_PIECE, MAX_PIECE = 256, 16 << 10


class TokenBucket:
    """Allows `rate` bytes per second, with bursts of at most BURST_SECONDS' worth. A
    piece larger than that is let through and paid for by waiting after it (the bucket
    goes into debt), so over any window of W seconds at most rate * W + burst + one piece
    pass. The clock and the sleep are injected (a test runs a transfer without waiting)."""

    def __init__(self, rate: float | None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.clock = clock
        self.sleep = sleep
        self.rate = rate or None
        self._tokens = 0.0
        self._last = clock()
        self._lock = threading.Lock()

    @property
    def piece(self) -> int:
        """How many bytes to move between two calls: 1% of a second's worth, within
        256 B..16 KiB (with the burst, that keeps any second within 3% of the cap)."""
        if not self.rate:
            return MAX_PIECE
        return int(min(MAX_PIECE, max(MIN_PIECE, self.rate * 0.01)))

    def set_rate(self, rate: float | None) -> None:
        """A new cap (the time window changed): what was paid so far stays paid."""
        with self._lock:
            self._refill()
            self.rate = rate or None
            if self.rate:
                self._tokens = min(self._tokens, self.rate * BURST_SECONDS)

    def _refill(self) -> None:
        now = self.clock()
        if self.rate:
            self._tokens = min(self.rate * BURST_SECONDS,
                               self._tokens + (now - self._last) * self.rate)
        self._last = now

    def consume(self, nbytes: int) -> float:
        """Block until `nbytes` may pass; return the seconds waited."""
        if not self.rate:
            return 0.0
        with self._lock:
            self._refill()
            self._tokens -= nbytes
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait:
            self.sleep(wait)
        return wait


_BYTE_UNITS = {"": 1, "K": 1024, "M": 1 << 20, "G": 1 << 30}
_BIT_UNITS = {"": 1, "K": 1000, "M": 1000_000, "G": 1000_000_000}


def parse_rate(text: str | None) -> float | None:
    """A rate -> bytes per second. Bytes: '512K', '2M', '100000', '1MB/s', '512KiB/s'
    (K = 1024). Bits, as network links are sold: '20mbit', '512kbps', '2Mbit/s' (k =
    1000; 'kbps' is kilobits per second, as in the bandwidth policy)."""
    if not text:
        return None
    t = text.strip().removesuffix("/s").removesuffix("/S")
    low = t.lower()
    bits = low.endswith(("bit", "bps"))
    if bits:
        t = t[:-3]
    else:
        t = t.upper().removesuffix("B").removesuffix("I")
    prefix = t[-1:].upper() if t[-1:].isalpha() else ""
    number = t[:-1] if prefix else t
    units = _BIT_UNITS if bits else _BYTE_UNITS
    try:
        value = float(number) * units[prefix] / (8 if bits else 1)
    except (ValueError, KeyError):
        raise ValueError(f"not a rate: {text!r} (e.g. 512K or 2M bytes per second, or "
                         "20mbit bits per second)") from None
    if value <= 0:
        raise ValueError(f"rate must be positive: {text!r}")
    return value

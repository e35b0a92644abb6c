"""Bandwidth caps as the policy states them: `kbps` is kilobits per second, as named
(1 kbps = 1000 bit/s = 125 bytes/s), and a rule's time window is read in the endpoint's
own local time. Shared by the server (which picks the rules for an endpoint's site and
subnet) and the agent (which applies them, by its own clock, to every transfer)."""

from __future__ import annotations

from datetime import time

BYTES_PER_KBPS = 1000 / 8


def kbps_to_bytes(kbps: int | None) -> float | None:
    """Bytes per second for a cap in kilobits per second (None or 0: no cap)."""
    return kbps * BYTES_PER_KBPS if kbps else None


def in_window(start: str | None, end: str | None, now: time) -> bool:
    """Whether `now` (the endpoint's local time of day) is within [start, end); no window
    is always; a window whose end is before its start wraps midnight (22:00-06:00)."""
    if not start or not end:
        return True
    a, b = time.fromisoformat(start), time.fromisoformat(end)
    return a <= now < b if a <= b else (now >= a or now < b)

"""The dashboard's storage chart as plain SVG geometry, drawn on the server: no chart
library, no script (the content security policy forbids inline script anyway)."""

from __future__ import annotations

from dataclasses import dataclass

from strata.model.units import human_bytes
from strata.server.services.fleet import HistoryPoint

WIDTH, HEIGHT, PAD = 600, 160, 4


@dataclass(frozen=True)
class StorageChart:
    logical: str  # polyline points
    new: str
    top: str  # the y axis' top, e.g. "12.0 GiB"
    first_day: str
    last_day: str
    ratio: str  # logical / new on the last day
    width: int = WIDTH
    height: int = HEIGHT


def _points(values: list[int], top: int) -> str:
    n = len(values)
    xs = [WIDTH / 2] if n == 1 else [PAD + i * (WIDTH - 2 * PAD) / (n - 1) for i in range(n)]
    if n == 1:  # one day: a flat line across, so it shows
        xs, values = [PAD, WIDTH - PAD], values * 2
    return " ".join(f"{x:.1f},{HEIGHT - PAD - v * (HEIGHT - 2 * PAD) / top:.1f}"
                    for x, v in zip(xs, values, strict=True))


def storage_chart(history: list[HistoryPoint]) -> StorageChart | None:
    if not history:
        return None
    top = max(p.logical_bytes for p in history) or 1
    last = history[-1]
    ratio = f"{last.logical_bytes / last.new_bytes:.1f}×" if last.new_bytes else "–"
    return StorageChart(logical=_points([p.logical_bytes for p in history], top),
                        new=_points([p.new_bytes for p in history], top),
                        top=human_bytes(top), first_day=history[0].day,
                        last_day=last.day, ratio=ratio)

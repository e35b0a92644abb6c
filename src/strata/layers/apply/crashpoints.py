"""Tests only: `crash_hook` is called with a label ("phase switching", "rename usr/bin/x",
...) before every step of an apply that changes the disk, so that a test can kill the
process at an exact point, or make that step fail."""

from __future__ import annotations

from collections.abc import Callable

crash_hook: Callable[[str], None] | None = None


def step(label: str) -> None:
    if crash_hook is not None:
        crash_hook(label)

"""Progress reporting from the engine to whoever is watching (a Rich bar, a log, nothing)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Progress:
    """Counters updated by worker threads; totals may arrive later from a counting pass.

    `watched`: someone shows it (a bar on a terminal), so estimating totals for an ETA
    is worth its cost; `phase` names the step under way when one command has several
    (an apply: the pre-update snapshot, then writing the update)."""

    files_done: int = 0
    bytes_done: int = 0
    total_files: int | None = None
    total_bytes: int | None = None
    watched: bool = False
    phase: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.files_done += files
            self.bytes_done += nbytes

    def restart(self, phase: str, total_files: int | None = None,
                total_bytes: int | None = None) -> None:
        """A new step: counters back to zero, its own totals."""
        with self._lock:
            self.phase, self.files_done, self.bytes_done = phase, 0, 0
            self.total_files, self.total_bytes = total_files, total_bytes

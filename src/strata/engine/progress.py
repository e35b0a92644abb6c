"""Progress reporting from the engine to whoever is watching (a Rich bar, a log, nothing)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Progress:
    """Counters updated by worker threads; totals may arrive later from a counting pass."""

    files_done: int = 0
    bytes_done: int = 0
    total_files: int | None = None
    total_bytes: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.files_done += files
            self.bytes_done += nbytes

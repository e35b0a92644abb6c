"""How processes writing to one store take turns: the commit lock, exclusive jobs (prune,
repair, the server's maintenance) and the writer sessions prune must respect.

Two implementations of one small contract: `LocalCoordination`, files in the store's
working state (flock and session files; every process on one host sharing that folder),
and `store/pg_shared.py`'s, in a PostgreSQL database shared by processes on any host.
The store, prune and repair see only the contract.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from strata.store.locks import Session, file_lock, live_sessions


class WriterSession(Protocol):
    """A registered writer: prune leaves alone what it may still commit."""

    started: float

    def refresh(self) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> WriterSession: ...
    def __exit__(self, *exc: object) -> None: ...


class JobLock(Protocol):
    def confirm(self) -> None:
        """Raise `StoreLocked` if the lock was lost meanwhile (a database connection
        cut): call before an irreversible step."""
        ...


class _FileJobLock:
    def confirm(self) -> None:
        pass  # a flock lasts as long as this process, which is running this


class Coordination(Protocol):
    def commit_lock(self) -> contextlib.AbstractContextManager[None]:
        """Short and exclusive: snapshot commits against prune's switch of the index."""
        ...

    def exclusive(self, name: str, what: str) -> contextlib.AbstractContextManager[JobLock]:
        """A job only one process may run at a time; `StoreLocked` at once if another
        process runs it (never a wait)."""
        ...

    def session(self, kind: str) -> WriterSession: ...

    def live_sessions(self, exclude: WriterSession | None = None) -> list[dict[str, Any]]:
        """Sessions that may still commit ({"kind", "started", ...}); stale ones go."""
        ...


class LocalCoordination:
    """Lock and session files in `locks_dir` (the store's `locks/`)."""

    def __init__(self, locks_dir: Path):
        self.locks_dir = locks_dir

    def commit_lock(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.locks_dir / "commit.lock")

    @contextlib.contextmanager
    def exclusive(self, name: str, what: str) -> Iterator[JobLock]:
        with file_lock(self.locks_dir / f"{name}.lock", blocking=False, what=what):
            yield _FileJobLock()

    def session(self, kind: str) -> Session:
        return Session(self.locks_dir, kind)

    def live_sessions(self, exclude: WriterSession | None = None) -> list[dict[str, Any]]:
        return live_sessions(self.locks_dir,
                             exclude=exclude if isinstance(exclude, Session) else None)

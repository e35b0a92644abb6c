"""Coordination between processes sharing a store.

- The commit lock (short, exclusive) serializes snapshot commits with the moment prune
  switches the index, so a commit always sees every chunk it names.
- The prune lock stops two prunes from running at once.
- Sessions: each writer registers itself; prune leaves alone every pack written since
  the oldest live session began, because those chunks may belong to a snapshot that is
  not committed yet. A session whose process died (same host) or that stopped
  refreshing (other hosts) no longer counts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from strata.errors import StoreLocked

SESSION_STALE_SECONDS = 3600


@contextlib.contextmanager
def file_lock(path: Path, *, blocking: bool = True, what: str = "store") -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            raise StoreLocked(f"{what} is locked by another process; try again later") from None
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Session:
    """A registered writer (backup, upload, prune) of the store."""

    def __init__(self, locks_dir: Path, kind: str):
        self.dir = locks_dir
        self.kind = kind
        self.started = time.time()
        self.path = locks_dir / f"session-{uuid.uuid4().hex}"
        self.refresh()

    def refresh(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        doc = {"kind": self.kind, "pid": os.getpid(), "host": socket.gethostname(),
               "started": self.started, "refreshed": time.time()}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def live_sessions(locks_dir: Path, exclude: Session | None = None) -> list[dict[str, Any]]:
    """Sessions that may still commit; stale ones are removed on the way."""
    out: list[dict[str, Any]] = []
    if not locks_dir.is_dir():
        return out
    host, now = socket.gethostname(), time.time()
    for p in locks_dir.glob("session-*"):
        if exclude is not None and p == exclude.path or p.suffix == ".tmp":
            continue
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if doc.get("host") == host:  # on this host, the process itself is the truth
            dead = not _pid_alive(int(doc.get("pid", 0)))
        else:
            dead = now - float(doc.get("refreshed", 0)) > SESSION_STALE_SECONDS
        if dead:
            p.unlink(missing_ok=True)
        else:
            out.append(doc)
    return out

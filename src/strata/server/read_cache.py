"""A small read-through cache for what every check-in needs (credentials, policies,
desired states), that never serves a value read before the change that outdated it.

The race it closes: a request starts loading a value from the catalog, an administrator
commits a change and invalidates, and only then does the request store what it read. A
plain cache would keep that stale value for its whole TTL (an endpoint told it is up to
date right after `strata assign`, a revoked device still let in). Here every
invalidation bumps a generation; a load that began under an older generation is returned
to its own caller (it began before the change) but never stored.

Changes must invalidate *after* their transaction committed (the server's `ctx.write()`
then `ctx.invalidate()`), so that any load which starts after the invalidation reads the
committed state. Within one process this makes every change visible at the very next
request. Across processes on one PostgreSQL catalog, every invalidation is also written
to a log in the catalog that the others read at most once a second before using their
cache (server/cache_coherence.py): a second is the bound there.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

# Tests only: called with the key after a load finished and before its value is stored,
# so a test can hold a load there while an administrator's change commits.
after_load_hook: Callable[[str], None] | None = None

# Set while a request runs on the event loop: a miss there would wait for the catalog
# with every other request waiting behind it, so it raises NeedsLoad instead and the
# request is run again in a worker thread (server/deps.py, routes/agent.py).
_hits_only: contextvars.ContextVar[bool] = contextvars.ContextVar("hits_only", default=False)


class NeedsLoad(Exception):  # noqa: N818 (a signal, not an error)
    """A cache miss where only hits may be served (see `hits_only`)."""


def may_load() -> bool:
    """False within `hits_only`: whoever would wait for the catalog raises NeedsLoad."""
    return not _hits_only.get()


@contextlib.contextmanager
def hits_only() -> Iterator[None]:
    """Within: a miss raises NeedsLoad rather than loading. What ran before the miss must
    be safe to run again (the caller repeats the whole request in a thread)."""
    token = _hits_only.set(True)
    try:
        yield
    finally:
        _hits_only.reset(token)


class ReadCache:
    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[object, float]] = {}
        self._generation = 0

    def _cached(self, key: str, now: float) -> tuple[tuple[object] | None, int]:
        """A live entry as a 1-tuple (its value may be anything), else None and the
        generation a load must still see when it stores; NeedsLoad under `hits_only`."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[1] > now:
                return (hit[0],), self._generation
            generation = self._generation
        if _hits_only.get():
            raise NeedsLoad(key)
        return None, generation

    def get(self, key: str, load: Callable[[], T], ttl: float | None = None) -> T:
        now = self._clock()
        hit, generation = self._cached(key, now)
        if hit is not None:
            return hit[0]  # type: ignore[return-value]
        value = load()
        if after_load_hook is not None:
            after_load_hook(key)
        if value is not None:  # never cache a miss: unknown keys must not fill memory
            with self._lock:
                if generation == self._generation:
                    self._entries[key] = (value, now + (self.ttl if ttl is None else ttl))
        return value

    def get_filling(self, key: str, load: Callable[[], tuple[T, dict[str, object]]]) -> T:
        """As `get`, for a load that reads more than `key` needs in the same query: it
        returns the value and other entries, stored along with it under the same rule
        (all, or none if an invalidation came while it loaded). Entries already cached
        are left as they are."""
        now = self._clock()
        hit, generation = self._cached(key, now)
        if hit is not None:
            return hit[0]  # type: ignore[return-value]
        value, more = load()
        if after_load_hook is not None:
            after_load_hook(key)
        if value is not None:
            with self._lock:
                if generation == self._generation:
                    expires = now + self.ttl
                    self._entries[key] = (value, expires)
                    for other, found in more.items():
                        held = self._entries.get(other)
                        if found is not None and (held is None or held[1] <= now):
                            self._entries[other] = (found, expires)
        return value

    def discard(self, key: str) -> None:
        """Forget one key; loads of any key in flight are not stored (cheap pessimism:
        a per-key generation would save them a reload, not worth the state)."""
        with self._lock:
            self._generation += 1
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

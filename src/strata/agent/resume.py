"""Downloads that survive bad links: chunks are kept one by one as they arrive, a broken
connection is retried with backoff for what is still missing, and a longer outage pauses
the download (DownloadPaused) instead of failing it; the next cycle resumes.

Each chunk is verified against its id, stored in the cache and appended to a journal
beside it; the cache's pack is made durable once per batch (ChunkReceiver.settle), and
the journal covers the chunks in between, so an agent killed midway finds them at its
next start (recover) and downloads none of them again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from strata.agent.client import ServerClient, ServerUnreachable
from strata.errors import CorruptData
from strata.model.transfer import MAGIC, Readable, bundle_record, iter_bundle, iter_stream
from strata.store.pack import decode_payload
from strata.store.repository import Store

BACKOFF_FIRST = 0.5  # seconds before the first retry; doubled after each failed one
BACKOFF_MAX = 30.0


class DownloadPaused(ServerUnreachable):
    """The server went away mid-download and did not come back within the retries: what
    arrived is kept, and the next try asks only for the rest."""


class ChunkReceiver:
    """Where downloaded chunks go: the cache (a Store), with a journal that holds each
    chunk from its arrival until the cache's pack is durable."""

    def __init__(self, cache: Store, journal: Path):
        self.cache = cache
        self.journal = journal
        self.received = 0
        self.recovered = self._recover()
        self._fd: int | None = None

    def _recover(self) -> int:
        """Move the chunks a killed download left in the journal into the cache. Each is
        verified against its id; a record cut short by the kill is dropped."""
        try:
            f = open(self.journal, "rb")  # noqa: SIM115 -- closed below, before the unlink
        except FileNotFoundError:
            return 0
        n = 0
        with f:
            try:
                for cid, raw_length, payload in iter_bundle(f):
                    try:
                        data = decode_payload(cid, payload, raw_length)
                    except CorruptData:
                        continue  # damaged on disk: it is simply downloaded again
                    if self.cache.store_chunks([cid], [data])[0]:
                        n += 1
            except CorruptData:
                pass  # the tail the kill cut: everything before it is kept
        self.cache.flush()
        self.journal.unlink()
        return n

    def keep(self, cid: bytes, data: bytes) -> None:
        """One verified chunk: into the journal at once (one write: a kill from here on
        leaves it readable), then into the cache's open pack."""
        if self._fd is None:
            self._fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            if os.fstat(self._fd).st_size == 0:
                os.write(self._fd, MAGIC)
        os.write(self._fd, bundle_record(cid, len(data), b"\x00" + data))
        self.cache.store_chunks([cid], [data])
        self.received += 1

    def settle(self) -> None:
        """Make the cache durable; the journal is then no longer needed."""
        self.cache.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            self.journal.unlink()


Decoder = Callable[[Readable], Iterator[tuple[bytes, int, bytes]]]


def fetch_chunks(client: ServerClient, path: str, ids: list[bytes],
                 keep: Callable[[bytes, bytes], None], *, decode: Decoder = iter_stream,
                 on_corrupt: Callable[[bytes, CorruptData], None] | None = None,
                 extra: dict[str, object] | None = None) -> list[bytes]:
    """Download `ids` from `path` into `keep`, chunk by chunk as they arrive (`decode`: a
    chunk stream, as layer downloads are, or a bundle, as restores are: model/transfer.py).
    A broken connection is retried for the chunks still missing, after 0.5 s, 1 s, 2 s, ...
    (the count restarts whenever a try brought something); after `client.retries`
    fruitless tries the download is paused (DownloadPaused). A chunk that fails its check
    goes to `on_corrupt` (without one, the download stops with CorruptData). Returns the
    ids the server did not send. `extra`: more fields of each request's JSON body (a
    reflector's ticket)."""
    wanted = set(ids)
    done: set[bytes] = set()
    failures = 0
    delay = BACKOFF_FIRST
    while len(done) < len(wanted):
        remaining = [c for c in dict.fromkeys(ids) if c not in done]
        before = len(done)
        try:
            with client.stream("POST", path, retries=0,
                               json={**(extra or {}), "ids": [c.hex() for c in remaining]}
                               ) as body:
                for cid, raw_length, payload in decode(body):
                    if cid not in wanted or cid in done:
                        raise CorruptData("the server sent a chunk that was not asked for")
                    try:
                        data = decode_payload(cid, payload, raw_length)  # verified by its id
                    except CorruptData as exc:
                        if on_corrupt is None:
                            raise
                        on_corrupt(cid, exc)
                    else:
                        keep(cid, data)
                    done.add(cid)
        except ServerUnreachable as exc:
            if len(done) > before:  # the link works, if badly: start the backoff over
                failures, delay = 0, BACKOFF_FIRST
            failures += 1
            if failures > client.retries:
                raise DownloadPaused(
                    f"{exc}; download paused with {len(done)} of {len(wanted)} chunks of this "
                    "batch kept: it resumes when the server answers") from None
            with client._lock:
                client.retried += 1
            client.sleep(max(delay, exc.retry_after))  # a busy server says how long
            delay = min(delay * 2, BACKOFF_MAX)
            continue
        break  # the answer ended: whatever is still missing, the server did not send
    return [c for c in dict.fromkeys(ids) if c not in done]

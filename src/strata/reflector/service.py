"""What the reflector does, without HTTP: decide whether a ticket allows a request, serve
chunks from the cache, fetch the missing ones from the server once however many agents
ask for them at the same moment (single flight), and warm layers ahead of demand."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from strata.agent.client import ServerRefused
from strata.errors import CorruptData, StrataError, TooLarge
from strata.model.reflector import ReflectorStats
from strata.model.tickets import Ticket, TicketRefused, verify_ticket
from strata.model.transfer import MAX_STREAM_BYTES
from strata.reflector.cache import ChunkCache
from strata.reflector.upstream import Upstream
from strata.server.rate_limit import ConcurrencyLimit

log = logging.getLogger("strata.reflector")
UPSTREAM_BATCH = 128  # chunks per fetch from the server: some 8 MiB, seconds on a WAN
SETS_KEPT = 16  # chunk lists of layers and snapshots held in memory
WAIT_SECONDS = 300.0  # how long a request waits on another's fetch of the same chunk
MAX_CHUNKS = 4096  # per request, as the agent batches them (agent/update.py)
PER_ENDPOINT = 2  # requests of one endpoint at once (the agent makes one at a time)


COUNTERS = ("bytes_from_server", "bytes_served", "hits", "misses", "refused",
            "deltas_from_server", "deltas_served")


class NotAllowed(StrataError):
    """A request for a chunk the ticket does not cover."""

    http_status = 403


@dataclass
class Counters:
    bytes_from_server: int = 0
    bytes_served: int = 0
    hits: int = 0
    misses: int = 0
    refused: int = 0
    deltas_from_server: int = 0
    deltas_served: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **amounts: int) -> None:
        with self._lock:
            for key, n in amounts.items():
                setattr(self, key, getattr(self, key) + n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: getattr(self, k) for k in COUNTERS}


class ReflectorService:
    def __init__(self, reflector_id: str, ticket_key: bytes, cache: ChunkCache,
                 upstream: Upstream, *, clock: Callable[[], float] = time.time,
                 counters: dict[str, int] | None = None):
        self.reflector_id = reflector_id
        self.ticket_key = ticket_key
        self.cache = cache
        self.upstream = upstream
        self.clock = clock
        self.counters = Counters()
        self.counters.add(**{k: v for k, v in (counters or {}).items()
                             if k in Counters.__dataclass_fields__ and not k.startswith("_")})
        self.slots = ConcurrencyLimit(PER_ENDPOINT)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="reflector-fetch")
        self._lock = threading.Lock()
        self._inflight: dict[bytes, Future[bytes]] = {}
        self._fetch_lock = threading.Lock()  # one fetch from the server at a time
        self._sets: OrderedDict[tuple[str, str], frozenset[bytes]] = OrderedDict()
        self.warmed: dict[str, str] = {}  # snapshot -> NAME:VERSION, warmed whole

    def close(self) -> None:
        """Let the fetches under way finish (their chunks made durable) before the cache
        closes: a closing store drops what was not flushed."""
        self._pool.shutdown(wait=True)

    # -- authorization ------------------------------------------------------------------

    def authorize(self, ticket_text: str, ids: list[bytes], snapshot: str | None = None
                  ) -> Ticket:
        """The ticket, if it is the server's, for this reflector, unexpired, and every id
        belongs to a layer or snapshot it allows; TicketRefused or NotAllowed otherwise."""
        try:
            ticket = verify_ticket(ticket_text, self.ticket_key, reflector=self.reflector_id,
                                   now=self.clock())
            if snapshot is None:
                sets = [self._chunk_set("", sid, ticket_text) for sid in sorted(ticket.snapshots)]
            elif snapshot in ticket.snapshots:
                sets = [self._chunk_set("", snapshot, ticket_text)]
            elif ticket.own_cvd:
                # One of the endpoint's own snapshots (a file restore): the server says,
                # for this request, whether it is and holds these chunks. One round trip
                # of ids rather than the snapshot's whole chunk list, which for a large
                # CVD would cost the WAN more than the few files restored.
                self._confirm(snapshot, ids, ticket_text)
                return ticket
            else:
                raise NotAllowed("this ticket does not allow reading that snapshot")
            if any(not any(c in s for s in sets) for c in ids):
                raise NotAllowed("a requested chunk is not part of what this ticket allows")
        except (TicketRefused, NotAllowed):
            self.counters.add(refused=1)
            raise
        return ticket

    def _confirm(self, sid: str, ids: list[bytes], ticket_text: str) -> None:
        try:
            self.upstream.check_chunks(sid, ids, ticket_text)
        except ServerRefused as exc:
            if exc.status in (403, 404):
                raise NotAllowed(f"the server does not let this ticket read {sid[:8]}") \
                    from None
            raise

    def _chunk_set(self, owner: str, sid: str, ticket_text: str) -> frozenset[bytes]:
        key = (owner, sid)
        with self._lock:
            hit = self._sets.get(key)
            if hit is not None:
                self._sets.move_to_end(key)
                return hit
        try:
            ids = frozenset(self.upstream.chunk_ids(sid, ticket_text))
        except ServerRefused as exc:
            if exc.status in (403, 404):
                raise NotAllowed(f"the server does not let this ticket read {sid[:8]}") \
                    from None
            raise
        with self._lock:
            self._sets[key] = ids
            while len(self._sets) > SETS_KEPT:
                self._sets.popitem(last=False)
        return ids

    # -- serving -----------------------------------------------------------------------------

    def admit(self, ids: list[bytes], ticket_text: str, snapshot: str | None = None
              ) -> tuple[list[bytes], Ticket]:
        """Check a request before anything is sent: the ticket allows every chunk, and the
        request is bounded as the server bounds its own (what the cache holds is known
        before anything is read; the server refuses a miss beyond its own bound)."""
        ids = list(dict.fromkeys(ids))
        if len(ids) > MAX_CHUNKS:  # before the ticket: an own snapshot's check sends them
            raise TooLarge(f"ask for at most {MAX_CHUNKS} chunks per request")
        ticket = self.authorize(ticket_text, ids, snapshot)
        if sum(self.cache.store.raw_sizes(ids).values()) > MAX_STREAM_BYTES:
            raise TooLarge(f"ask for at most {MAX_CHUNKS} chunks and {MAX_STREAM_BYTES} "
                           "bytes per request")
        return ids, ticket

    def stream(self, ids: list[bytes], ticket: Ticket, ticket_text: str,
               snapshot: str | None = None) -> Iterator[tuple[bytes, bytes] | None]:
        """The chunks of an admitted request in the order asked, each verified against its
        id, as they become available: hits at once, misses as the server's answer arrives
        (fetched once, by whichever request missed them first). None before a wait: the
        caller sends what it has so far."""
        with self.slots.slot(ticket.endpoint, "downloads"):
            lacking = set(self.cache.missing(ids))
            self.counters.add(hits=len(ids) - len(lacking), misses=len(lacking))
            waits = self._claim([c for c in ids if c in lacking], ticket_text, snapshot)
            for cid in ids:
                data = None if cid in waits else self.cache.get(cid)
                if data is None and cid not in waits:  # damaged or evicted since: again
                    waits.update(self._claim([cid], ticket_text, snapshot))
                if data is None:
                    fut = waits[cid]
                    if not fut.done():
                        yield None  # what is ready goes out before the wait
                    try:
                        data = fut.result(timeout=WAIT_SECONDS)
                    except TimeoutError:
                        raise StrataError("timed out waiting for the server to send a "
                                          "chunk") from None
                yield cid, data

    def serve(self, ids: list[bytes], ticket_text: str, snapshot: str | None = None
              ) -> list[tuple[bytes, bytes]]:
        """`admit` and `stream`, gathered (for callers that want the whole answer)."""
        ids, ticket = self.admit(ids, ticket_text, snapshot)
        return [x for x in self.stream(ids, ticket, ticket_text, snapshot) if x is not None]

    def _claim(self, ids: list[bytes], ticket_text: str, snapshot: str | None,
               tasks: list[Future[None]] | None = None) -> dict[bytes, Future[bytes]]:
        """A future per chunk: the one of the fetch already under way for it, or of a new
        fetch of all those nobody is fetching yet (started in the background). Each chunk
        crosses the WAN once, however many agents ask for it at the same moment."""
        with self._lock:
            mine = [c for c in ids if c not in self._inflight]
            for c in mine:
                self._inflight[c] = Future()
            waits = {c: self._inflight[c] for c in ids}
        # In slices, so that the first chunks reach the agents within seconds, not after
        # the server has compressed and sent a whole 64 MiB batch.
        for i in range(0, len(mine), UPSTREAM_BATCH):
            task = self._pool.submit(self._fetch, mine[i:i + UPSTREAM_BATCH], ticket_text,
                                     snapshot, waits)
            if tasks is not None:
                tasks.append(task)
        return waits

    def _fetch(self, mine: list[bytes], ticket_text: str, snapshot: str | None,
               waits: dict[bytes, Future[bytes]]) -> None:
        """Fetch `mine` from the server, handing each chunk to its waiters as it arrives
        (verified, and in the cache, durable before the claim is released)."""
        got: set[bytes] = set()

        def keep(cid: bytes, data: bytes) -> None:
            self.cache.put(cid, data)  # CorruptData for a chunk that is not its id
            got.add(cid)
            waits[cid].set_result(data)

        error: BaseException | None = None
        try:
            with self._fetch_lock:
                # A chunk another process (an import) cached meanwhile is not asked for.
                for cid in mine:
                    if cid not in self.cache.missing([cid]):
                        data = self.cache.get(cid)
                        if data is not None:
                            got.add(cid)
                            waits[cid].set_result(data)
                ask = [c for c in mine if c not in got]
                before = self.upstream.bytes_received
                try:
                    if ask:
                        self.upstream.fetch(ask, keep, ticket=ticket_text, snapshot=snapshot)
                finally:
                    self.counters.add(bytes_from_server=self.upstream.bytes_received - before)
        except BaseException as exc:  # every waiter hears of it
            error = exc
            log.warning("fetching %d chunks from the server: %s", len(mine), exc)
        finally:
            try:
                self.cache.settle()
            finally:
                with self._lock:
                    for cid in mine:
                        if cid not in got:
                            waits[cid].set_exception(
                                error if isinstance(error, StrataError) else CorruptData(
                                    f"the server did not send chunk {cid.hex()[:16]}"))
                        self._inflight.pop(cid, None)

    # -- file deltas -----------------------------------------------------------------------

    def delta(self, did: bytes, ticket_text: str) -> bytes:
        """A file delta's body, by id, if the ticket (a delta ticket the server signed for
        this endpoint, after checking it holds the old files) names it: from the cache,
        else fetched from the server once however many agents ask at the same moment,
        checked against its id before it is cached or served. It is content-addressed
        like a chunk, so it lives in the chunk cache (the store verifies it again on
        every read, and evicts it like any pack)."""
        try:
            ticket = verify_ticket(ticket_text, self.ticket_key, reflector=self.reflector_id,
                                   now=self.clock())
            if did.hex() not in ticket.deltas:
                raise NotAllowed("this ticket does not allow reading that delta")
        except (TicketRefused, NotAllowed):
            self.counters.add(refused=1)
            raise
        with self.slots.slot(ticket.endpoint, "downloads"):
            data = self.cache.get(did)
            if data is not None:
                self.counters.add(hits=1)
                return data
            self.counters.add(misses=1)
            with self._lock:
                fut = self._inflight.get(did)
                mine = fut is None
                if fut is None:
                    fut = self._inflight[did] = Future()
            if mine:
                try:
                    before = self.upstream.bytes_received
                    try:
                        data = self.upstream.delta(did, ticket_text)  # checked by its id
                    finally:
                        self.counters.add(
                            bytes_from_server=self.upstream.bytes_received - before)
                    self.counters.add(deltas_from_server=1)
                    self.cache.put(did, data)
                    self.cache.settle()
                    fut.set_result(data)
                except BaseException as exc:
                    fut.set_exception(exc)
                    raise
                finally:
                    with self._lock:
                        self._inflight.pop(did, None)
            try:
                return fut.result(timeout=WAIT_SECONDS)
            except TimeoutError:
                raise StrataError("timed out waiting for the server to send a delta") \
                    from None

    # -- warm-up ---------------------------------------------------------------------------

    def warm(self, sid: str, label: str) -> int:
        """Fetch every chunk of a layer the cache lacks (the server checks that one of
        this reflector's endpoints is assigned it); the bytes that crossed the WAN."""
        before = self.counters.bytes_from_server
        ids = self.upstream.chunk_ids(sid)
        lacking = self.cache.missing(ids)
        tasks: list[Future[None]] = []
        for fut in self._claim(lacking, "", None, tasks).values():
            fut.result(timeout=WAIT_SECONDS)
        for task in tasks:  # and durable: this process may close the cache next
            task.result(timeout=WAIT_SECONDS)
        self.warmed[sid] = label
        return self.counters.bytes_from_server - before

    def stats(self) -> ReflectorStats:
        return ReflectorStats(**self.counters.snapshot(), cache_bytes=self.cache.stored_bytes(),
                              cache_limit=self.cache.limit,
                              evicted_bytes=self.cache.evicted_bytes)

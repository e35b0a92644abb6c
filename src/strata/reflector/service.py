"""What the reflector does, without HTTP: decide whether a ticket allows a request, serve
chunks from the cache, fetch the missing ones from the server once however many agents
ask for them at the same moment (single flight), and warm layers ahead of demand."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from strata.agent.client import ServerRefused
from strata.errors import CorruptData, StrataError, TooLarge
from strata.model.reflector import ReflectorStats
from strata.model.tickets import Ticket, TicketRefused, verify_ticket
from strata.model.transfer import MAX_STREAM_BYTES
from strata.reflector.cache import ChunkCache
from strata.reflector.upstream import Upstream
from strata.server.rate_limit import ConcurrencyLimit

SETS_KEPT = 16  # chunk lists of layers and snapshots held in memory
WAIT_SECONDS = 300.0  # how long a request waits on another's fetch of the same chunk
WARM_BATCH = 256  # chunks per warm-up request (at most 64 MiB at the largest chunk size)
MAX_CHUNKS = 4096  # per request, as the agent batches them (agent/update.py)
PER_ENDPOINT = 2  # requests of one endpoint at once (the agent makes one at a time)


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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **amounts: int) -> None:
        with self._lock:
            for key, n in amounts.items():
                setattr(self, key, getattr(self, key) + n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: getattr(self, k) for k in ("bytes_from_server", "bytes_served", "hits",
                                                   "misses", "refused")}


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
        self._lock = threading.Lock()
        self._inflight: dict[bytes, Future[bytes]] = {}
        self._fetch_lock = threading.Lock()  # one fetch from the server at a time
        self._sets: OrderedDict[tuple[str, str], frozenset[bytes]] = OrderedDict()
        self.warmed: dict[str, str] = {}  # snapshot -> NAME:VERSION, warmed whole

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
                # One of the endpoint's own snapshots: the server says whether it is; the
                # answer is kept for this endpoint alone.
                sets = [self._chunk_set(ticket.endpoint, snapshot, ticket_text)]
            else:
                raise NotAllowed("this ticket does not allow reading that snapshot")
            if any(not any(c in s for s in sets) for c in ids):
                raise NotAllowed("a requested chunk is not part of what this ticket allows")
        except (TicketRefused, NotAllowed):
            self.counters.add(refused=1)
            raise
        return ticket

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

    def serve(self, ids: list[bytes], ticket_text: str, snapshot: str | None = None
              ) -> list[tuple[bytes, bytes]]:
        """Chunks (id, bytes) in the order asked, each verified against its id: from the
        cache, or fetched from the server with the same ticket."""
        ids = list(dict.fromkeys(ids))
        ticket = self.authorize(ticket_text, ids, snapshot)
        # Bounded per request as the server bounds it: what the cache holds is known
        # before anything is read; a miss the server refuses beyond its own bound.
        if len(ids) > MAX_CHUNKS or \
                sum(self.cache.store.raw_sizes(ids).values()) > MAX_STREAM_BYTES:
            raise TooLarge(f"ask for at most {MAX_CHUNKS} chunks and {MAX_STREAM_BYTES} "
                           "bytes per request")
        with self.slots.slot(ticket.endpoint, "downloads"):
            return self.chunks(ids, ticket_text, snapshot)

    def chunks(self, ids: list[bytes], ticket_text: str = "", snapshot: str | None = None
               ) -> list[tuple[bytes, bytes]]:
        found: dict[bytes, bytes] = {}
        for cid in ids:
            data = self.cache.get(cid)
            if data is not None:
                found[cid] = data
        lacking = [c for c in ids if c not in found]
        self.counters.add(hits=len(found), misses=len(lacking))
        if lacking:
            found.update(self._single_flight(lacking, ticket_text, snapshot))
        return [(c, found[c]) for c in ids]

    def _single_flight(self, ids: list[bytes], ticket_text: str, snapshot: str | None
                       ) -> dict[bytes, bytes]:
        """Fetch what nobody is fetching yet; wait for the rest. Each chunk crosses the WAN
        once, however many agents ask for it at the same moment."""
        with self._lock:
            mine = [c for c in ids if c not in self._inflight]
            for c in mine:
                self._inflight[c] = Future()
            waits = {c: self._inflight[c] for c in ids}
        if mine:
            self._fetch(mine, ticket_text, snapshot, waits)
        out = {}
        for cid, fut in waits.items():
            try:
                out[cid] = fut.result(timeout=WAIT_SECONDS)
            except TimeoutError:
                raise StrataError("timed out waiting for the server to send a chunk") from None
        return out

    def _fetch(self, mine: list[bytes], ticket_text: str, snapshot: str | None,
               waits: dict[bytes, Future[bytes]]) -> None:
        got: dict[bytes, bytes] = {}
        error: BaseException | None = None
        try:
            # A chunk someone else fetched and cached while this one waited is not asked for.
            with self._fetch_lock:
                again = set(self.cache.missing(mine))
                for cid in mine:
                    if cid not in again:
                        data = self.cache.get(cid)
                        if data is not None:
                            got[cid] = data
                ask = [c for c in mine if c not in got]
                before = self.upstream.bytes_received
                try:
                    if ask:
                        self.upstream.fetch(ask, got.__setitem__, ticket=ticket_text,
                                            snapshot=snapshot)
                finally:
                    self.counters.add(bytes_from_server=self.upstream.bytes_received - before)
                self.cache.put_many([(c, got[c]) for c in ask if c in got])
        except BaseException as exc:  # every waiter hears of it, then it goes up
            error = exc
            raise
        finally:
            with self._lock:
                for cid in mine:
                    fut = waits[cid]
                    if cid in got:
                        fut.set_result(got[cid])
                    else:
                        fut.set_exception(error if isinstance(error, StrataError) else
                                          CorruptData(f"the server did not send chunk "
                                                      f"{cid.hex()[:16]}"))
                    self._inflight.pop(cid, None)

    # -- warm-up ---------------------------------------------------------------------------

    def warm(self, sid: str, label: str) -> int:
        """Fetch every chunk of a layer the cache lacks (the server checks that one of
        this reflector's endpoints is assigned it); the bytes that crossed the WAN."""
        before = self.counters.bytes_from_server
        ids = self.upstream.chunk_ids(sid)
        lacking = self.cache.missing(ids)
        for i in range(0, len(lacking), WARM_BATCH):
            self._single_flight(lacking[i:i + WARM_BATCH], "", None)
        self.warmed[sid] = label
        return self.counters.bytes_from_server - before

    def stats(self) -> ReflectorStats:
        return ReflectorStats(**self.counters.snapshot(), cache_bytes=self.cache.stored_bytes(),
                              cache_limit=self.cache.limit,
                              evicted_bytes=self.cache.evicted_bytes)

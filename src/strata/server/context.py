"""What every request handler shares: settings, the store, the catalog, live uploads."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

from sqlalchemy import Connection, Engine, Table, bindparam, update
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import sessionmaker

from strata.server.cache_coherence import ALL, CacheInvalidations
from strata.server.catalog.models import Endpoint
from strata.server.holdings import ChunkHoldings
from strata.server.possession import NonceMinter
from strata.server.rate_limit import ConcurrencyLimit, RateLimiter
from strata.server.read_cache import NeedsLoad, ReadCache, may_load
from strata.server.stream_cache import StreamCache
from strata.store.coordination import WriterSession
from strata.store.repository import Store

if TYPE_CHECKING:
    from strata.model.tickets import TicketSigner
    from strata.server.services.deltas import DeltaService
    from strata.server.services.reflectors import ReflectorRoutes
    from strata.signing.repository import SigningRepository

UPLOAD_IDLE_SECONDS = 3600  # an upload session nobody touched for this long is over
_SESSION_REFRESH_SECONDS = 10  # prune trusts a session refreshed within the hour
SEEN_FLUSH_SECONDS = 2.0
T = TypeVar("T")
# Admin changes clear the cache at once (server/read_cache.py); the TTL bounds how long
# another server process may serve a value it cached before a change made elsewhere.
CACHE_SECONDS = 300.0
# Chunk ids one endpoint may ask about (missing, proofs): a first centralization of 1 TB
# asks about some 16 million, in hours; probing for other endpoints' data needs far more.
IDS_PER_SECOND = 20_000
IDS_BURST = 1_000_000
# Bytes one endpoint may have the server read and hash to check its proofs: a clone's OS
# (some GB) proves in one burst; more costs the server real time, so it is paced.
PROOF_BYTES_PER_SECOND = 64 << 20
PROOF_BYTES_BURST = 4 << 30
UPLOADS_AT_ONCE = 2  # per endpoint (and layer downloads): the agent does one at a time


@dataclass
class ServerSettings:
    data_dir: Path
    catalog_url: str = ""
    max_upload_bytes: int = 64 << 20
    maintenance_interval: float = 3600.0  # seconds between retention + prune runs
    store: str = ""  # a directory or s3://BUCKET/PREFIX; "" is DATA/store
    s3_endpoint_url: str = ""  # "" is AWS_ENDPOINT_URL, or AWS itself
    s3_region: str = ""  # "" is AWS_REGION or AWS_DEFAULT_REGION
    # A device credential is replaced at the first check-in after `credential_rotation`,
    # and refused once `credential_lifetime` has passed without one (the agent enrolls
    # again).
    encrypt: bool = False  # a new store is encrypted (an existing one must be)
    passphrase: str | None = field(default=None, repr=False)  # of an encrypted store
    credential_rotation: timedelta = timedelta(days=7)
    credential_lifetime: timedelta = timedelta(days=90)
    # Endpoints that must hold a chunk of private data before any endpoint may learn the
    # server has it: an attacker needs this many enrolled endpoints of its own to probe.
    common_holders: int = 3

    def __post_init__(self) -> None:
        if not self.catalog_url:
            self.catalog_url = f"sqlite:///{self.data_dir / 'catalog.sqlite'}"


@dataclass
class ServerContext:
    settings: ServerSettings
    store: Store
    db: sessionmaker
    streams: StreamCache
    holdings: ChunkHoldings
    possession: NonceMinter
    id_queries: RateLimiter = field(
        default_factory=lambda: RateLimiter(IDS_PER_SECOND, IDS_BURST))
    proof_bytes: RateLimiter = field(
        default_factory=lambda: RateLimiter(PROOF_BYTES_PER_SECOND, PROOF_BYTES_BURST))
    upload_slots: ConcurrencyLimit = field(
        default_factory=lambda: ConcurrencyLimit(UPLOADS_AT_ONCE))
    download_slots: ConcurrencyLimit = field(
        default_factory=lambda: ConcurrencyLimit(UPLOADS_AT_ONCE))
    uploads: dict[str, tuple[WriterSession, float]] = field(default_factory=dict)
    _uploads_lock: threading.Lock = field(default_factory=threading.Lock)
    _snapshot_chunks: OrderedDict[str, frozenset[bytes]] = field(default_factory=OrderedDict)
    _write_lock: threading.Lock = field(default_factory=threading.Lock)
    _seen: dict[str, tuple[datetime, str]] = field(default_factory=dict)
    _inventories: dict[str, dict] = field(default_factory=dict)
    _cache: ReadCache = field(default_factory=lambda: ReadCache(CACHE_SECONDS))
    # With a PostgreSQL catalog shared by several processes: another process's changes
    # reach this one's cache within a second (server/cache_coherence.py).
    coherence: CacheInvalidations | None = None

    @functools.cached_property
    def signing(self) -> SigningRepository:
        """The signed layer metadata (DATA/signing; python-tuf loads on first use)."""
        from strata.signing.repository import SigningRepository

        return SigningRepository(self.settings.data_dir / "signing")

    @functools.cached_property
    def deltas(self) -> DeltaService:
        """File deltas of layer updates, kept in DATA/cache/deltas (services/deltas.py)."""
        from strata.server.metrics import DELTA_CACHE
        from strata.server.services.deltas import DeltaService

        return DeltaService(self.settings.data_dir / "cache" / "deltas", metric=DELTA_CACHE)

    @functools.cached_property
    def tickets(self) -> TicketSigner:
        """The key that signs reflector tickets (DATA/reflector-tickets.key)."""
        from strata.model.tickets import TicketSigner

        return TicketSigner(self.settings.data_dir / "reflector-tickets.key")

    @functools.cached_property
    def reflector_routes(self) -> ReflectorRoutes:
        """Which endpoints each reflector serves now, as their check-ins were answered."""
        from strata.server.services.reflectors import ReflectorRoutes

        return ReflectorRoutes()

    def session(self) -> DbSession:
        """A session for reading (SQLite in WAL mode and PostgreSQL run reads side by side)."""
        return self.db()

    def connection(self) -> Connection:
        """A plain connection, for one Core query where a session's bookkeeping would
        cost more than the query (a check-in's credential lookup). With PostgreSQL in
        autocommit: a transaction's BEGIN and ROLLBACK are two more round trips, and a
        lone SELECT reads one consistent state anyway (with SQLite, switching modes
        costs more than it saves)."""
        conn = cast(Engine, self.db.kw["bind"]).connect()
        if conn.dialect.name == "postgresql":
            return conn.execution_options(isolation_level="AUTOCOMMIT")
        return conn

    @contextlib.contextmanager
    def write(self) -> Iterator[DbSession]:
        """A session for writing, committed at the end. Writers take turns on a lock here
        rather than in SQLite's busy handler, whose back-off sleeps would add latency. The
        lock orders this process's writers only: a row that another process on the same
        PostgreSQL catalog may change at once must be read FOR UPDATE."""
        with self._write_lock, self.db() as db:
            yield db
            db.commit()

    def cached(self, key: str, load: Callable[[], T], ttl: float | None = None) -> T:
        """What every check-in needs (credentials, policies, desired states), read through
        a cache that an admin change clears (`invalidate`) and that never keeps a value
        read before such a change (see read_cache.py), here or in another process."""
        self._catch_up()
        return self._cache.get(key, load, ttl)

    def cached_filling(self, key: str, load: Callable[[], tuple[T, dict[str, object]]]) -> T:
        """As `cached`, for a load whose one query also finds other keys' values
        (ReadCache.get_filling): a check-in's credential lookup brings its head and its
        empty desired state along, one catalog round trip instead of three."""
        self._catch_up()
        return self._cache.get_filling(key, load)

    def _catch_up(self) -> None:
        """Drop what other processes on the catalog changed since this one last looked."""
        if self.coherence is not None:
            if not may_load() and self.coherence.due():
                raise NeedsLoad("coherence")  # a catalog query: not on the event loop
            changed = self.coherence.changes()
            if changed and ALL in changed:
                self._cache.clear()
            elif changed:
                for outdated in changed:
                    self._cache.discard(outdated)

    def uncache(self, key: str) -> None:
        self._cache.discard(key)
        if self.coherence is not None:  # other processes may hold the key too
            self.coherence.publish(key)

    def invalidate(self) -> None:
        """Call after the change's transaction has committed."""
        self._cache.clear()
        if self.coherence is not None:
            self.coherence.publish(ALL)

    def mark_seen(self, endpoint_id: str, ip: str) -> None:
        """Note a device's visit; a background thread writes them in batches (every
        SEEN_FLUSH_SECONDS) so a check-in itself writes nothing."""
        with self._uploads_lock:
            self._seen[endpoint_id] = (datetime.now(UTC), ip)

    def note_inventory(self, endpoint_id: str, inventory: dict) -> None:
        """Keep a check-in's new inventory for the next batch of visits: a real agent's
        differs at nearly every check-in (free disk space), and a write each would make
        the fleet's check-ins take turns on the catalog."""
        with self._uploads_lock:
            self._inventories[endpoint_id] = inventory

    def forget_inventory(self, endpoint_id: str) -> None:
        """Drop a noted inventory (call holding the write lock, about to write a newer one)."""
        with self._uploads_lock:
            self._inventories.pop(endpoint_id, None)

    def flush_seen(self) -> None:
        if not (self._seen or self._inventories):
            return
        # Under the write lock: an inventory written at once meanwhile (new hardware) is
        # never overwritten by an older one from this batch.
        with self.write() as db:
            with self._uploads_lock:
                seen, self._seen = self._seen, {}
                inventories, self._inventories = self._inventories, {}
            # One executemany for the lot, and a row deleted meanwhile (a forgotten
            # endpoint) is left out rather than failing the batch, as the ORM's would.
            endpoints = cast(Table, Endpoint.__table__)
            by_id = endpoints.c.id == bindparam("eid")
            if seen:
                db.execute(update(endpoints).where(by_id).values(
                    last_seen=bindparam("when"), last_ip=bindparam("ip")),
                    [{"eid": eid, "when": when, "ip": ip} for eid, (when, ip) in seen.items()])
            if inventories:
                db.execute(update(endpoints).where(by_id).values(
                    inventory=bindparam("inventory")),
                    [{"eid": eid, "inventory": inv} for eid, inv in inventories.items()])

    def touch_upload(self, endpoint_id: str) -> None:
        """Register (or refresh) the endpoint's upload session in the store, so a prune
        running meanwhile leaves its not-yet-committed chunks alone."""
        with self._uploads_lock:
            entry = self.uploads.get(endpoint_id)
            if entry is None:
                self.uploads[endpoint_id] = (self.store.session(f"upload:{endpoint_id}"),
                                             time.monotonic())
            else:
                now = time.monotonic()
                if now - entry[1] > _SESSION_REFRESH_SECONDS:
                    entry[0].refresh()  # a file write and rename: not for every request
                    self.uploads[endpoint_id] = (entry[0], now)

    def end_upload(self, endpoint_id: str) -> None:
        with self._uploads_lock:
            entry = self.uploads.pop(endpoint_id, None)
        if entry:
            entry[0].close()

    def expire_uploads(self) -> None:
        now = time.monotonic()
        with self._uploads_lock:
            idle = [k for k, (_, t) in self.uploads.items() if now - t > UPLOAD_IDLE_SECONDS]
        for k in idle:
            self.end_upload(k)

    def snapshot_chunks(self, snapshot_id: str) -> frozenset[bytes]:
        """Every chunk a snapshot needs (cached): what its owner may download."""
        with self._uploads_lock:
            hit = self._snapshot_chunks.get(snapshot_id)
            if hit is not None:
                self._snapshot_chunks.move_to_end(snapshot_id)
                return hit
        snap = self.store.load_snapshot(snapshot_id)
        ids = set(snap.manifest_chunk_ids())
        for entry in self.store.iter_manifest(snap):
            ids.update(c for c, _ in entry.chunks)
        result = frozenset(ids)
        with self._uploads_lock:
            self._snapshot_chunks[snapshot_id] = result
            while len(self._snapshot_chunks) > 16:
                self._snapshot_chunks.popitem(last=False)
        return result

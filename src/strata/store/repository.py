"""The store: chunks in packs, an index over them, and snapshots that name them.

This is the single-instance store shared by the local CLI, the server, the agent cache
and the reflector. Writers call `store_chunk` from any number of threads; chunks already
held anywhere in the store are never written twice.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from strata.errors import (
    CorruptData,
    MissingChunks,
    SnapshotNotFound,
    StoreExists,
    StoreNotFound,
    StoreWriteFailed,
    StrataError,
)
from strata.model.entry import Entry
from strata.model.ids import content_id
from strata.model.manifest import decode_manifest
from strata.model.snapshot import Snapshot
from strata.store import crypto
from strata.store.backend import Backend, LocalBackend, ObjectNotFound, StoreFull
from strata.store.chunker import Chunker, ChunkerParams
from strata.store.coordination import Coordination, LocalCoordination, WriterSession
from strata.store.index import ChunkIndex, Index, Location
from strata.store.pack import (
    BlobCodec,
    PackEntry,
    PackWriter,
    decode_payload,
    footer_trailer_length,
    parse_trailer,
    trailer_read_size,
)

FORMAT_VERSION = 1
DEFAULT_PACK_SIZE = 16 << 20
# A pack is read whole by check and repair: beyond 1 GiB that is memory, not a pack; below
# 64 KiB a store is millions of objects.
MIN_PACK_SIZE, MAX_PACK_SIZE = 64 << 10, 1 << 30


def check_pack_size(pack_size: int) -> None:
    if not MIN_PACK_SIZE <= pack_size <= MAX_PACK_SIZE:
        raise StrataError(f"pack size {pack_size} bytes is out of range: give 64KiB to 1GiB "
                          "(default 16MiB)")
SNAPSHOT_AAD = b"strata-snapshot"
# In a working state whose index and locks live in a database (several server processes):
# `strata store` refuses it rather than trust its stale SQLite index.
SHARED_MARKER = "index-in-database"

PassphraseSource = Callable[[], str | None]  # None: no passphrase to be had


class SharedState(Protocol):
    """Where several processes' stores keep one index and one set of locks (a database):
    `open(store_id)` gives this process's handle on both."""

    def open(self, store_id: str) -> tuple[Index, Coordination]: ...


class _PackSlot:
    """One open pack and the lock for it. The store keeps one per core and each writing
    thread keeps to its own, so writers append (copy and hash) side by side instead of
    queueing on one lock (where a profile of a backup found readers 14% of their time)."""

    __slots__ = ("lock", "writer")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.writer: PackWriter | None = None


@dataclass(frozen=True)
class StoreConfig:
    id: str
    chunker: ChunkerParams
    compression: str  # "zstd:N" or "none"
    encryption: str  # "aes-256-gcm" or "none"
    pack_size: int = DEFAULT_PACK_SIZE
    version: int = FORMAT_VERSION

    @property
    def zstd_level(self) -> int:
        if self.compression == "none":
            return 0
        algo, _, level = self.compression.partition(":")
        if algo != "zstd" or not level.isdigit() or not 1 <= int(level) <= 22:
            raise StrataError(f"unsupported compression {self.compression!r} "
                              "(use zstd:1..22 or none)")
        return int(level)

    def to_json(self) -> bytes:
        doc = {"version": self.version, "id": self.id, "compression": self.compression,
               "encryption": self.encryption, "pack_size": self.pack_size,
               "chunker": {"min": self.chunker.min_size, "avg": self.chunker.avg_size,
                           "max": self.chunker.max_size}}
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> StoreConfig:
        try:
            d = json.loads(data)
            c = d["chunker"]
            cfg = cls(id=d["id"], chunker=ChunkerParams(c["min"], c["avg"], c["max"]),
                      compression=d["compression"], encryption=d["encryption"],
                      pack_size=int(d["pack_size"]), version=int(d["version"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptData(f"store config is malformed ({exc})") from None
        if cfg.version != FORMAT_VERSION:
            raise StrataError(f"store format {cfg.version} is not supported by this version")
        return cfg


def _write_failed(exc: OSError | StoreFull) -> StoreWriteFailed:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
    return StoreWriteFailed(f"could not write to the store: {reason}")


class Store:
    """A store on a `Backend`, with this process's local working state in `state_dir`:
    the chunk index (derived data, rebuilt from pack trailers if lost), the writer
    sessions and locks, and the spool where packs are written before they are saved.
    For a store in a local directory the two are the same folder. With `shared`, the
    index, locks and sessions are in a database several processes share instead."""

    def __init__(self, backend: Backend, config: StoreConfig, cipher: crypto.Cipher,
                 state_dir: Path, shared: SharedState | None = None):
        self.backend = backend
        self.state_dir = Path(state_dir)
        self.config = config
        self.cipher = cipher
        self.codec = BlobCodec(cipher, config.zstd_level)
        self.chunker = Chunker(config.chunker)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.locks_dir = self.state_dir / "locks"
        self._lock = threading.Lock()  # the pending set, the index connection, pack list
        self._index_lock: contextlib.AbstractContextManager[object] = self._lock
        self._shared_index = shared is not None
        # The index and the locks are this folder's, unless processes on several hosts
        # share them in a database (`SharedState`, store/pg_shared.py).
        self.index: Index
        self.coordination: Coordination
        marker = self.state_dir / SHARED_MARKER
        if shared is None:
            if marker.exists():
                # The SQLite index here is stale and the lock files unused: a backup
                # would dedup against chunks prune has removed, a prune would not see
                # the servers' uploads.
                raise StrataError(f"the index and locks of the store served from "
                                  f"{self.state_dir} are in the servers' PostgreSQL catalog; "
                                  "work on it through the server (for a read-only look at an "
                                  "object store, give another --state directory)")
            self.index = ChunkIndex(self.state_dir / "index.sqlite")
            self.coordination = LocalCoordination(self.locks_dir)
        else:
            self.index, self.coordination = shared.open(config.id)
            # A database index takes calls from any thread on pooled connections, so
            # lookups need not queue on the store's lock (a network round trip each,
            # where SQLite's shared connection must be used by one thread at a time).
            self._index_lock = contextlib.nullcontext()
            if not marker.exists():
                marker.write_text("The chunk index and locks of this store are in a "
                                  "PostgreSQL database (strata server --catalog).\n")
        self.spool_dir = self.state_dir / "tmp"
        self._slots = [_PackSlot() for _ in range(max(2, os.cpu_count() or 2))]
        self._next_slot = itertools.count()
        self._thread = threading.local()  # which slot this thread writes to
        self._pending: set[bytes] = set()  # claimed ids not yet in an indexed pack
        self._pack_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pack-writer")
        self._writes: list[Future[str]] = []
        self._writes_slots = threading.Semaphore(2)
        self._write_error: BaseException | None = None  # from a pack written in the background

    # -- lifecycle ------------------------------------------------------------
    @classmethod
    def init(cls, path: Path, *, chunk_avg: int = 64 * 1024, compression: str = "zstd:3",
             passphrase: str | None = None, pack_size: int = DEFAULT_PACK_SIZE,
             shared: SharedState | None = None) -> Store:
        """Create a store in the local directory `path` (new or empty)."""
        check_pack_size(pack_size)
        path = Path(path)
        if (path / "config").exists():
            raise StoreExists(f"a store already exists at {path}")
        if path.exists() and any(path.iterdir()):
            raise StoreExists(f"{path} is not empty; choose an empty or new directory")
        path.mkdir(parents=True, exist_ok=True)
        for folder in ("packs", "snapshots", "locks", "tmp"):
            (path / folder).mkdir(exist_ok=True)
        return cls.init_on(LocalBackend(path), path, chunk_avg=chunk_avg,
                           compression=compression, passphrase=passphrase,
                           pack_size=pack_size, shared=shared)

    @classmethod
    def init_on(cls, backend: Backend, state_dir: Path, *, chunk_avg: int = 64 * 1024,
                compression: str = "zstd:3", passphrase: str | None = None,
                pack_size: int = DEFAULT_PACK_SIZE, shared: SharedState | None = None) -> Store:
        """Create a store on `backend`, keeping local working state in `state_dir`."""
        check_pack_size(pack_size)
        if backend.exists("config", "config"):
            raise StoreExists("a store already exists there")
        if any(True for kind in ("keys", "snapshots", "packs") for _ in backend.list(kind)):
            # An interrupted init (its key file saved, its config not) or someone else's
            # objects: a second key file could be taken for this store's.
            raise StoreExists("that location already holds store objects but no config; "
                              "choose an empty one")
        config = StoreConfig(id=uuid.uuid4().hex, chunker=ChunkerParams.from_avg(chunk_avg),
                             compression=compression,
                             encryption="aes-256-gcm" if passphrase is not None else "none",
                             pack_size=pack_size)
        config.zstd_level  # noqa: B018 -- validates the compression spec before writing
        cipher: crypto.Cipher = crypto.PlainCipher()
        if passphrase is not None:
            master, keyfile = crypto.make_key_file(passphrase)
            backend.save("keys", content_id(keyfile).hex()[:16], keyfile)
            cipher = crypto.AesGcmCipher(master)
        # The config last: a store without one was never made (`init` may be run again).
        backend.save("config", "config", config.to_json())
        return cls(backend, config, cipher, state_dir, shared)

    @classmethod
    def open(cls, path: Path, passphrase: str | PassphraseSource | None = None,
             shared: SharedState | None = None) -> Store:
        """Open the store in the local directory `path`."""
        path = Path(path)
        if not (path / "config").is_file():
            raise StoreNotFound(f"no Strata store at {path}")
        return cls.open_on(LocalBackend(path), path, passphrase, shared)

    @classmethod
    def open_on(cls, backend: Backend, state_dir: Path,
                passphrase: str | PassphraseSource | None = None,
                shared: SharedState | None = None) -> Store:
        """Open the store on `backend`, keeping local working state in `state_dir`."""
        try:
            config = StoreConfig.from_json(backend.load("config", "config"))
        except ObjectNotFound:
            raise StoreNotFound("no Strata store there (it has no config)") from None
        cipher: crypto.Cipher = crypto.PlainCipher()
        if config.encryption != "none":
            if callable(passphrase):
                passphrase = passphrase()
            if passphrase is None:
                raise StrataError("this store is encrypted: give a passphrase "
                                  "(STRATA_PASSPHRASE or --passphrase-file)")
            names = list(backend.list("keys"))
            if not names:
                raise CorruptData("encrypted store has no key file")
            master = None
            for name in names:
                try:
                    master = crypto.open_key_file(backend.load("keys", name), passphrase)
                    break
                except StrataError as exc:
                    last = exc
            if master is None:
                raise last
            cipher = crypto.AesGcmCipher(master)
        return cls(backend, config, cipher, state_dir, shared)

    def close(self) -> None:
        self._pack_io.shutdown(wait=True)
        for writer in self._take_writers():  # chunks never flushed belong to no snapshot
            self._abandon(writer)
        self.backend.close()
        self.index.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def session(self, kind: str) -> WriterSession:
        return self.coordination.session(kind)

    def commit_lock(self) -> contextlib.AbstractContextManager[None]:
        return self.coordination.commit_lock()

    # -- writing chunks -------------------------------------------------------
    def claim_many(self, ids: list[bytes]) -> set[bytes]:
        """The ids among `ids` the caller must store; one index query for the lot."""
        if not self._shared_index:
            with self._lock:
                fresh = [c for c in dict.fromkeys(ids) if c not in self._pending]
                held = self.index.present(fresh) if fresh else set()
                mine = {c for c in fresh if c not in held}
                self._pending.update(mine)
                return mine
        with self._lock:
            fresh = [c for c in dict.fromkeys(ids) if c not in self._pending]
        held = self.index.present(fresh) if fresh else set()
        with self._lock:  # claimed meanwhile by another thread: that one stores it
            mine = {c for c in fresh if c not in held and c not in self._pending}
            self._pending.update(mine)
            return mine

    def store_chunk(self, cid: bytes, data: bytes | memoryview) -> int:
        """Store a chunk unless the store already has it; return the stored bytes added."""
        return self.store_chunks([cid], [data])[0]

    @contextlib.contextmanager
    def claimed(self, ids: list[bytes]) -> Iterator[set[bytes]]:
        """`claim_many` for a block that stores the claimed ids: discard each from the set
        as it goes to `put_claimed`. If the block fails, the ids still in the set are
        released; kept claimed, this store would skip them as "on their way" forever."""
        mine = self.claim_many(ids)
        try:
            yield mine
        except BaseException:
            with self._lock:
                self._pending.difference_update(mine)
            raise

    def store_chunks(self, ids: list[bytes], chunks: list[bytes | memoryview]) -> list[int]:
        """`store_chunk` for several at once, with one index query for all of them."""
        added = []
        with self.claimed(ids) as mine:
            for cid, data in zip(ids, chunks, strict=True):
                if cid in mine:
                    blob = self.codec.encode(cid, data)
                    mine.discard(cid)  # a chunk repeated in the list is stored once
                    added.append(self.put_claimed(cid, blob, len(data)))
                else:
                    added.append(0)
        return added

    def put_claimed(self, cid: bytes, blob: bytes, raw_length: int) -> int:
        """Add an already-encoded blob for an id this writer claimed."""
        slot = getattr(self._thread, "slot", None)
        if slot is None:
            slot = self._thread.slot = self._slots[next(self._next_slot) % len(self._slots)]
        with slot.lock:
            try:
                if slot.writer is None:  # opened on the first new chunk
                    slot.writer = self.new_pack_writer()
                slot.writer.add(cid, blob, raw_length)
            except OSError as exc:  # e.g. a full disk: this pack can never be finished
                broken, slot.writer = slot.writer, None
                if broken is not None:
                    self._abandon(broken)  # releases this chunk too: it is in the pack
                else:
                    with self._lock:
                        self._pending.discard(cid)
                raise _write_failed(exc) from exc
            full = None
            if slot.writer.size >= self.config.pack_size:
                full, slot.writer = slot.writer, None
        if full is not None:
            # Finish (trailer, fsync, index) in the background so the caller keeps
            # producing; at most two full packs wait for it.
            self._writes_slots.acquire()
            fut = self._pack_io.submit(self.install_pack, full)
            fut.add_done_callback(self._written)
            with self._lock:
                self._writes.append(fut)
        if self._write_error is not None:  # stop now, not after reading the rest in vain
            self._raise_write_error()
        return len(blob)

    def _raise_write_error(self) -> None:
        """Report a failed background write once: here, not again at the next flush."""
        with self._lock:
            failed, self._write_error = self._write_error, None
            self._writes = [f for f in self._writes if not (f.done() and f.exception())]
        if failed is not None:
            raise failed

    def _written(self, fut: Future[str]) -> None:
        self._writes_slots.release()
        if fut.exception() is not None:
            self._write_error = fut.exception()

    def new_pack_writer(self) -> PackWriter:
        return PackWriter(self.cipher, self.spool_dir)

    def install_pack(self, writer: PackWriter, *, move: bool = False) -> str:
        """Finish a pack, move it into the store and index it. `move` repoints chunks
        already indexed elsewhere at this pack (repack); otherwise they keep theirs."""
        try:
            done = writer.finish()
            # The backend decides how a finished file becomes an object: the local
            # directory renames it into place, an object store would upload it.
            self.backend.save_file("packs", done.name, done.path)
        except (OSError, StoreFull) as exc:
            self._abandon(writer)  # a full disk must not also leave a half pack in tmp/
            raise _write_failed(exc) from exc
        with self._index_lock:
            if move:
                self.index.move_chunks(done.name, done.size, done.entries)
            else:
                self.index.add_pack(done.name, done.size, done.entries)
        with self._lock:  # indexed first: a claim in between finds them held
            self._pending.difference_update(e.id for e in done.entries)
        return done.name

    def _take_writers(self) -> list[PackWriter]:
        taken = []
        for slot in self._slots:
            with slot.lock:
                if slot.writer is not None:
                    taken.append(slot.writer)
                    slot.writer = None
        return taken

    def flush(self) -> None:
        """Write out the partly filled packs so every stored chunk is durable and indexed."""
        writers = self._take_writers()
        with self._lock:
            writes, self._writes = self._writes, []
        try:
            for fut in writes:
                fut.result()  # re-raises a failed write (e.g. a full disk)
            while writers:
                self.install_pack(writers.pop())
        finally:
            for writer in writers:  # not written because an earlier one failed
                self._abandon(writer)
            self._write_error = None  # raised here from its future, if there was one

    def _abandon(self, writer: PackWriter) -> None:
        """Throw away an unfinished pack; its chunks may be stored again (they would be
        taken as on their way, and skipped, for as long as this store stays open)."""
        writer.discard()
        with self._lock:
            self._pending.difference_update(e.id for e in writer.entries)

    # -- reading chunks -------------------------------------------------------
    def read_blob(self, pack: str, offset: int, length: int) -> bytes:
        try:
            data = self.backend.load("packs", pack, offset, length)
        except ObjectNotFound:
            raise CorruptData(f"pack {pack[:16]} is missing") from None
        if len(data) != length:
            raise CorruptData(f"pack {pack[:16]} is truncated")
        return data

    def load_chunk(self, cid: bytes) -> bytes:
        with self._index_lock:
            loc = self.index.lookup(cid)
        return self._load_at(cid, loc)

    def _load_at(self, cid: bytes, loc: Location | None) -> bytes:
        if loc is None:
            raise CorruptData(f"chunk {cid.hex()[:16]} is not in the store")
        return self.codec.decode(cid, self.read_blob(loc.pack, loc.offset, loc.length),
                                 loc.raw_length)

    def load_chunks(self, ids: list[bytes]) -> list[bytes | CorruptData]:
        """Load several chunks (one index query for all); a damaged one is returned as its
        error, not raised."""
        with self._index_lock:
            where = self.index.locate(list(dict.fromkeys(ids)))
        out: list[bytes | CorruptData] = []
        for cid in ids:
            try:
                out.append(self._load_at(cid, where.get(cid)))
            except CorruptData as exc:
                out.append(exc)
        return out

    def load_payload(self, cid: bytes) -> tuple[bytes, int]:
        """The chunk's unsealed stored form (flag + zstd or raw bytes) and its raw length,
        verified against its id: what a chunk bundle carries, without recompressing."""
        with self._index_lock:
            loc = self.index.lookup(cid)
        if loc is None:
            raise CorruptData(f"chunk {cid.hex()[:16]} is not in the store")
        payload = self.cipher.open(self.read_blob(loc.pack, loc.offset, loc.length), cid)
        decode_payload(cid, payload, loc.raw_length)
        return payload, loc.raw_length

    def present(self, ids: list[bytes]) -> set[bytes]:
        """Which of `ids` the store holds."""
        with self._index_lock:
            return self.index.present(ids)

    def raw_sizes(self, ids: Iterable[bytes]) -> dict[bytes, int]:
        """The raw length of each of `ids` the store holds, from the index alone: what
        reading them would cost, known before any is read."""
        return {c: loc.raw_length for c, loc in self._locate(ids).items()}

    def stored_and_raw(self, ids: Iterable[bytes]) -> tuple[int, int]:
        """Bytes those of `ids` the store holds take in it, and their raw bytes, from the
        index alone: what reading them would cost, and how well they compressed."""
        where = self._locate(ids).values()
        return sum(loc.length for loc in where), sum(loc.raw_length for loc in where)

    @property
    def compresses(self) -> bool:
        """Whether chunks are compressed when stored (else their stored size says
        nothing of how well they would)."""
        return self.config.zstd_level > 0

    def _locate(self, ids: Iterable[bytes]) -> dict[bytes, Location]:
        with self._index_lock:
            return self.index.locate(list(dict.fromkeys(ids)))

    def pack_of(self, cid: bytes) -> str | None:
        """The pack holding `cid`, or None (a cache's recency is kept per pack)."""
        with self._lock:
            loc = self.index.lookup(cid)
        return loc.pack if loc is not None else None

    def pack_sizes(self) -> dict[str, int]:
        """Every indexed pack and its size."""
        with self._lock:
            return self.index.packs()

    def evict_packs(self, names: Iterable[str]) -> None:
        """Forget whole packs and delete them: a bounded cache (the branch reflector's)
        makes room. Not for a store whose snapshots may reference them (that is prune)."""
        names = sorted(names)
        with self._lock:
            self.index.drop_packs(names)
        self.backend.remove_many("packs", names)

    def missing_chunks(self, ids: Iterable[bytes]) -> list[bytes]:
        want = list(dict.fromkeys(ids))
        with self._index_lock:
            have = self.index.present(want)
        return [c for c in want if c not in have]

    # -- packs and index ------------------------------------------------------
    def read_pack_trailer(self, name: str) -> list[PackEntry]:
        return self.pack_trailer(name)[1]

    def pack_trailer(self, name: str) -> tuple[int, list[PackEntry]]:
        """A pack's size and the entries its trailer lists, in one or two ranged reads."""
        size = self.backend.stat("packs", name).size
        want = trailer_read_size(size)
        tail = self.backend.load("packs", name, size - want, want)
        need = footer_trailer_length(tail) if len(tail) >= 12 else 0
        if need > len(tail) and need <= size:
            tail = self.backend.load("packs", name, size - need, need)
        return size, parse_trailer(tail, size, self.cipher)

    def unindexed_packs(self) -> list[str]:
        known = self.index.packs()
        return [n for n in self.backend.list("packs") if n not in known]

    def reconcile_index(self) -> list[str]:
        """Index packs that exist but are unknown (a writer died before indexing them)."""
        added = []
        with self.commit_lock():
            for name in self.unindexed_packs():
                try:
                    size, entries = self.pack_trailer(name)
                except (CorruptData, OSError):
                    continue  # damaged: `check` reports it
                with self._lock:
                    self.index.add_pack(name, size, entries)
                added.append(name)
        return added

    def rebuild_index(self, progress: Callable[[str], None] | None = None) -> tuple[int, list[str]]:
        """Recreate the index from pack trailers alone. Returns (packs indexed, damaged)."""
        damaged, count = [], 0
        # One transaction: a rebuild killed midway leaves the old index, never half of one.
        with self.commit_lock(), self._lock, self.index.transaction():
            self.index.clear(in_transaction=True)
            for name in self.backend.list("packs"):
                try:
                    size, entries = self.pack_trailer(name)
                except (CorruptData, OSError):
                    damaged.append(name)
                    continue
                self.index.add_pack(name, size, entries, in_transaction=True)
                count += 1
                if progress:
                    progress(name)
        return count, damaged

    # -- snapshots ------------------------------------------------------------
    def commit_snapshot(self, snap: Snapshot, referenced: Iterable[bytes]) -> str:
        """Atomically record a snapshot, refusing if any referenced chunk is absent."""
        self.flush()
        with self.commit_lock():
            missing = self.missing_chunks(referenced)
            if missing:
                raise MissingChunks(missing)
            sid = snap.compute_id()
            self.backend.save("snapshots", sid, self.cipher.seal(snap.to_bytes(), SNAPSHOT_AAD))
        snap.id = sid
        return sid

    def load_snapshot(self, sid: str) -> Snapshot:
        try:
            raw = self.backend.load("snapshots", sid)
        except ObjectNotFound:
            raise SnapshotNotFound(f"no snapshot {sid[:8]} in this store") from None
        data = self.cipher.open(raw, SNAPSHOT_AAD)
        snap = Snapshot.from_bytes(data, sid)
        if snap.compute_id() != sid:
            raise CorruptData(f"snapshot {sid[:8]} does not match its id")
        return snap

    def snapshot_ids(self) -> list[str]:
        return list(self.backend.list("snapshots"))

    def snapshots(self, damaged: list[str] | None = None) -> list[Snapshot]:
        """All readable snapshots, oldest first. A damaged record is skipped (its id added
        to `damaged`), so one bad file never stops backups: `check` reports it."""
        out = []
        for sid in self.snapshot_ids():
            try:
                out.append(self.load_snapshot(sid))
            except CorruptData:
                if damaged is not None:
                    damaged.append(sid)
        return sorted(out, key=lambda s: (s.time, s.id))

    def resolve_id(self, ref: str) -> str:
        """The full id of a snapshot named by its id or a unique prefix (not loaded, so
        this works for damaged records too)."""
        matches = [s for s in self.snapshot_ids() if s.startswith(ref.lower())] if ref else []
        if not matches:
            raise SnapshotNotFound(f"no snapshot {ref!r} in this store")
        if len(matches) > 1:
            raise SnapshotNotFound(f"snapshot id {ref!r} is ambiguous; give more characters")
        return matches[0]

    def resolve_snapshot(self, ref: str) -> Snapshot:
        """A snapshot by full id, unique id prefix, or 'latest'."""
        if ref == "latest":
            snaps = self.snapshots()
            if not snaps:
                raise SnapshotNotFound("the store has no snapshots yet")
            return snaps[-1]
        return self.load_snapshot(self.resolve_id(ref))

    def remove_snapshot(self, sid: str) -> None:
        self.backend.remove("snapshots", sid)

    def iter_manifest(self, snap: Snapshot) -> Iterator[Entry]:
        return decode_manifest(self.load_chunk(cid) for cid in snap.manifest_chunk_ids())

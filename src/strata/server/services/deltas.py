"""Deltas of the changed files of a layer update (strata.engine.delta). The endpoint names
groups of files, per file the content it holds and the content it needs; the server
answers with a delta per group where one pays, and the endpoint fetches the rest by
chunks.

Each group's delta is computed once and kept in a stream cache (the same cache as the
chunk streams', in its own directory): a thousand endpoints moving off the same old base
form the same groups and cost one computation each. An endpoint may name as old only
content it holds (its own latest snapshot, the layers it last applied or is assigned) and
as new only content of its layers: a delta reveals where the new files match the old, so
it is only made against content the endpoint may read whole.
"""

from __future__ import annotations

import os
import re
import struct
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import Counter

from strata.engine import delta as codec
from strata.engine.delta import (
    MAX_DELTA_BYTES,
    GroupDelta,
    compressed_alone,
    encode,
    group_key,
    pack_deltas,
    pays,
    worth_trying,
)
from strata.errors import CorruptData, Forbidden, Invalid, NotFound, StrataError, TooLarge
from strata.model.entry import EntryType
from strata.model.ids import ID_LEN, content_id
from strata.model.reflector import MAX_OFFERED, DeltaOffer, DeltaOfferRequest, OfferedDelta
from strata.model.tickets import Ticket
from strata.model.wire import MAX_DELTA_FILES, DeltaGroup
from strata.server.catalog.models import Assignment, Endpoint, Layer
from strata.server.context import ServerContext
from strata.server.metrics import DELTA_CPU, DELTAS
from strata.server.services import snapshots
from strata.server.services.layer_downloads import allowed_snapshots
from strata.server.stream_cache import StreamCache

# New bytes one request may ask deltas for (some 16 s of level-19 work when nothing is
# cached); a single group may be larger (one file of up to MAX_DELTA_BYTES).
MAX_BATCH_BYTES = 16 << 20
_ALONE = struct.Struct("<Q")  # a cache entry: the new file's size compressed alone, delta
_INDEXES = 8  # snapshots whose file index is kept (a fleet moves between a few bases)
_BY_ID = 0xD1  # the cache "level" of the entries naming where a delta's body is
_KEY = re.compile(rb"[0-9a-f]{64}")
DELTA_TICKET_SECONDS = 600  # a delta ticket's life: the agent fetches the bodies at once

File = tuple[int, list[tuple[bytes, int]]]  # a file's size and chunks
Files = dict[bytes, File]  # content hash -> the file


class DeltaService:
    """The delta cache and, per snapshot, which content its files hold."""

    def __init__(self, directory: Path, max_bytes: int = 4 << 30,
                 metric: Counter | None = None):
        self.cache = StreamCache(directory, max_bytes, *([metric] if metric else []))
        # Computations at once: each holds both sides of a group, a match window over
        # them and level 19's tables (some 170 MiB for an 8 MiB group), so a burst of
        # first requests queues here rather than taking the server's memory.
        self.computing = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))
        self._files: OrderedDict[str, Files] = OrderedDict()
        self._lock = threading.Lock()

    def note_id(self, did: bytes, key: str) -> None:
        """Remember which cache entry holds the delta `did` (a small entry of its own, so
        that any server process sharing the data directory finds it)."""
        pointer = self.cache.key(_BY_ID, [did])
        if self.cache.peek(pointer) != key.encode():
            self.cache.keep(pointer, key.encode())

    def by_id(self, did: bytes) -> bytes | None:
        """The delta whose body hashes to `did`, if its entry is still cached."""
        key = self.cache.peek(self.cache.key(_BY_ID, [did]))
        if key is None or not _KEY.fullmatch(key):
            return None
        body = self.cache.peek(key.decode())
        if body is None or len(body) < _ALONE.size:
            return None
        delta = body[_ALONE.size:]
        return delta if content_id(delta) == did else None

    def files(self, ctx: ServerContext, sid: str) -> Files:
        with self._lock:
            hit = self._files.get(sid)
            if hit is not None:
                self._files.move_to_end(sid)
                return hit
        out: Files = {}
        for e in snapshots.entries(ctx, sid):
            if e.type is EntryType.FILE and e.size <= MAX_DELTA_BYTES:
                out.setdefault(e.content_hash, (e.size, list(e.chunks)))
        with self._lock:
            self._files[sid] = out
            while len(self._files) > _INDEXES:
                self._files.popitem(last=False)
        return out


def _hash(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise Invalid("content hashes must be hex") from None
    if len(raw) != ID_LEN:
        raise Invalid(f"content hashes must be {ID_LEN} bytes")
    return raw


def _find(ctx: ServerContext, sids: list[str], h: bytes) -> File | None:
    for sid in sids:
        hit = ctx.deltas.files(ctx, sid).get(h)
        if hit is not None:
            return hit
    return None


def _content(ctx: ServerContext, h: bytes, chunks: list[tuple[bytes, int]]) -> bytes:
    data = b"".join(ctx.store.load_chunk(cid) for cid, _ in chunks)  # each verified
    if content_id(data) != h:
        raise CorruptData(f"file {h.hex()[:16]} does not match its content hash")
    return data


def _applied_layers(ctx: ServerContext, ep: Endpoint) -> list[str]:
    """The snapshots of the layers last applied on the endpoint (what it runs now)."""
    with ctx.session() as db:
        a = db.get(Assignment, ep.id)
        rows = [db.get(Layer, i) for i in (a.applied_layers if a is not None else []) or []]
        return [r.snapshot for r in rows if r is not None]


def _held(ctx: ServerContext, ep: Endpoint, layers: list[str]) -> list[str]:
    """What the endpoint may name as its old version: the layers it last applied, the
    layers its desired state names, its own latest snapshot. Looked up in that order: the
    layers' file indexes serve the whole fleet, an endpoint's own snapshot only itself."""
    head, _ = snapshots.cached_head(ctx, ep.id)
    return list(dict.fromkeys([*_applied_layers(ctx, ep), *layers,
                               *([head] if head else [])]))


def delta_bases(ctx: ServerContext, ep: Endpoint) -> list[str]:
    """The snapshots whose manifest the endpoint may send its new one as a delta against
    (the same it may name as old versions of files: `_held`)."""
    return _held(ctx, ep, sorted(allowed_snapshots(ctx, ep)))


def _group_deltas(ctx: ServerContext, ep: Endpoint, groups: list[DeltaGroup]
                  ) -> list[tuple[GroupDelta, str, int]]:
    """A delta for each named group where one pays (with the key of its cache entry and
    its number of files), nothing for the others (the agent fetches those by chunks)."""
    if sum(len(g.files) for g in groups) > MAX_DELTA_FILES:
        raise TooLarge(f"ask for deltas of at most {MAX_DELTA_FILES} files per request")
    parsed = [([(_hash(f.old), _hash(f.new)) for f in g.files], g.lacking) for g in groups]
    layers = sorted(allowed_snapshots(ctx, ep))
    held = _held(ctx, ep, layers)
    found = []
    total = 0
    for pairs, lacking in parsed:
        files: list[tuple[bytes, File, bytes, File]] = []
        for old_hash, new_hash in pairs:
            new = _find(ctx, layers, new_hash)
            if new is None:
                raise Forbidden("a requested file is not part of this endpoint's layers")
            old = _find(ctx, held, old_hash)
            if old is not None:  # else edited on the endpoint since its snapshot: the
                files.append((old_hash, old, new_hash, new))  # same answer whoever holds it
        total += sum(f[3][0] for f in files)
        if total > MAX_BATCH_BYTES and len(parsed) > 1:
            raise TooLarge(f"ask for deltas of at most {MAX_BATCH_BYTES} bytes of files "
                           "per request, or one group")
        if len(files) == len(pairs):  # a group the endpoint holds every old file of
            found.append((files, lacking))
    out = []
    for files, lacking in found:
        old_size, new_size = sum(f[1][0] for f in files), sum(f[3][0] for f in files)
        if not worth_trying(old_size, new_size, lacking):
            continue
        entry = _cached_delta(ctx, files)
        if entry is None:
            continue
        alone, delta, key = entry
        if pays(len(delta), alone, new_size, lacking):
            out.append((GroupDelta(group_key([f[0] for f in files]),
                                   group_key([f[2] for f in files]), new_size, delta), key,
                        len(files)))
        else:
            DELTAS.labels("does-not-pay").inc(len(files))
    return out


def file_deltas(ctx: ServerContext, ep: Endpoint, groups: list[DeltaGroup]) -> bytes:
    """A `pack_deltas` body: a delta for each named group where one pays, nothing for the
    others (the agent fetches those by chunks)."""
    out = _group_deltas(ctx, ep, groups)
    for _, _, n in out:
        DELTAS.labels("sent").inc(n)
    return pack_deltas([d for d, _, _ in out])


# -- through a branch reflector --------------------------------------------------------------


def delta_offer(ctx: ServerContext, ep: Endpoint, req: DeltaOfferRequest) -> DeltaOffer:
    """The deltas of a request, by id and size, and a short-lived ticket naming exactly
    those ids, for the reflectors of the request that the server routes this endpoint to:
    the agent fetches the bodies there. The possession check is this one, at the server,
    per request; the reflector checks only the ticket. No ticket if none of the named
    reflectors serves the endpoint now (the agent then asks the server for the bodies)."""
    if len(req.groups) > MAX_OFFERED:
        raise TooLarge(f"ask for at most {MAX_OFFERED} groups per delta offer")
    found = _group_deltas(ctx, ep, req.groups)
    for _, _, n in found:
        DELTAS.labels("offered").inc(n)
    return _offer(ctx, ep, [(d, key) for d, key, _ in found], req.reflectors)


def manifest_offer(ctx: ServerContext, ep: Endpoint, sid: str, base: str,
                   reflector_ids: list[str]) -> DeltaOffer:
    """A layer manifest's delta against one the endpoint holds, offered by id as file
    deltas are (no delta: it does not pay, the agent fetches the manifest whole)."""
    found = _manifest_delta(ctx, ep, sid, base)
    if found is not None:
        DELTAS.labels("manifest-offered").inc()
    return _offer(ctx, ep, [found] if found is not None else [], reflector_ids)


def _offer(ctx: ServerContext, ep: Endpoint, found: list[tuple[GroupDelta, str]],
           reflector_ids: list[str]) -> DeltaOffer:
    from strata.server.services import reflectors

    offered = []
    for d, key in found:
        did = content_id(d.delta)
        ctx.deltas.note_id(did, key)
        offered.append(OfferedDelta(old_key=d.old_key.hex(), new_key=d.new_key.hex(),
                                    new_size=d.new_size, id=did.hex(), size=len(d.delta)))
    ids = reflectors.serving(ctx, ep, reflector_ids)
    if not ids or not offered:
        return DeltaOffer(deltas=offered)
    now = int(time.time())
    ticket = Ticket(endpoint=ep.id, reflectors=tuple(ids), snapshots=frozenset(),
                    own_cvd=False, issued=now, expires=now + DELTA_TICKET_SECONDS,
                    deltas=frozenset(o.id for o in offered))
    return DeltaOffer(ticket=ctx.tickets.sign(ticket), deltas=offered,
                      expires=datetime.fromtimestamp(ticket.expires, UTC))


def delta_by_id(ctx: ServerContext, did: bytes) -> bytes | None:
    """The body of a delta offered earlier, from the cache (None once it is gone: the
    reflector then fails the agent's request, and the agent asks the server)."""
    return ctx.deltas.by_id(did)


def manifest_delta(ctx: ServerContext, ep: Endpoint, sid: str, base: str) -> bytes:
    """A layer manifest the endpoint's desired state names, as a `pack_deltas` body of one
    record against a layer manifest it holds (the previous version of the layer): a
    manifest changes little between versions. Empty when the delta does not pay."""
    found = _manifest_delta(ctx, ep, sid, base)
    if found is None:
        return pack_deltas([])
    DELTAS.labels("manifest").inc()
    return pack_deltas([found[0]])


def _manifest_delta(ctx: ServerContext, ep: Endpoint, sid: str, base: str
                    ) -> tuple[GroupDelta, str] | None:
    """The delta of layer `sid`'s manifest against `base`'s (one the endpoint holds) and
    its cache entry's key; None when it does not pay."""
    layers = sorted(allowed_snapshots(ctx, ep))
    if sid not in layers:
        raise NotFound(f"no layer or snapshot {sid[:8]} assigned to this endpoint")
    if base not in _held(ctx, ep, layers):
        raise NotFound(f"no layer {base[:8]} on this endpoint to patch from")
    new = snapshots.manifest_bytes(ctx, sid, "layer")
    old = snapshots.manifest_bytes(ctx, base, "layer")
    if max(len(old), len(new)) > MAX_DELTA_BYTES:
        return None
    old_hash, new_hash = content_id(old), content_id(new)
    level = codec.DELTA_LEVEL

    def make() -> bytes:
        with ctx.deltas.computing:
            started = time.thread_time()
            body = _ALONE.pack(compressed_alone(new)) + encode(old, new, level)
            DELTA_CPU.inc(time.thread_time() - started)
            return body

    body = ctx.deltas.cache.get_or_make(level, [old_hash, new_hash], make)
    (alone,) = _ALONE.unpack_from(body)
    delta = body[_ALONE.size:]
    if not pays(len(delta), alone, len(new), len(new)):
        return None
    return (GroupDelta(old_hash, new_hash, len(new), delta),
            ctx.deltas.cache.key(level, [old_hash, new_hash]))


def _cached_delta(ctx: ServerContext, files: list[tuple[bytes, File, bytes, File]]
                  ) -> tuple[int, bytes, str] | None:
    """(the group's new files compressed alone, the delta, its cache entry's key), made
    once per group; None if the store cannot give back a version (the files then go by
    chunks, whose own read reports the damage)."""
    level = codec.DELTA_LEVEL

    def make() -> bytes:
        with ctx.deltas.computing:
            started = time.thread_time()
            old = b"".join(_content(ctx, h, f[1]) for h, f, _, _ in files)
            new = b"".join(_content(ctx, h, f[1]) for _, _, h, f in files)
            body = _ALONE.pack(compressed_alone(new)) + encode(old, new, level)
            DELTA_CPU.inc(time.thread_time() - started)
            return body

    ids = [h for old_hash, _, new_hash, _ in files for h in (old_hash, new_hash)]
    try:
        body = ctx.deltas.cache.get_or_make(level, ids, make)
    except StrataError:
        return None
    (alone,) = _ALONE.unpack_from(body)
    return alone, body[_ALONE.size:], ctx.deltas.cache.key(level, ids)

"""The sync protocol, in each endpoint's own view of the store: which chunks it must send
(or prove it has), verified uploads, snapshot commits that reference only chunks the
endpoint has shown it holds, and reading its own snapshots back for a file restore."""

from __future__ import annotations

import hmac
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from strata.engine.delta import MAX_DELTA_BYTES, decode, read_deltas
from strata.errors import CorruptData, Invalid, MissingChunks, NotFound, TooLarge
from strata.model.ids import content_id
from strata.model.manifest import HEADER as MANIFEST_HEADER
from strata.model.possession import decode_proofs, proof
from strata.model.snapshot import Snapshot, now_iso
from strata.model.transfer import BundleParser
from strata.model.wire import (
    CommitRequest,
    ManifestUploadResponse,
    MissingResponse,
    ProveResponse,
    RestoreReport,
    SnapshotSummary,
    UploadResponse,
)
from strata.server import metrics
from strata.server.catalog.models import Assignment, Endpoint, SnapshotRecord, Transaction
from strata.server.context import ServerContext
from strata.server.holdings import shareable_path
from strata.server.rate_limit import RateLimiter, TooManyRequests
from strata.server.services import audit, deltas, snapshots
from strata.server.services.facts import endpoint_family
from strata.server.services.layer_downloads import allowed_chunks
from strata.server.services.layers import rules_for
from strata.server.services.manifests import parse_chunk_ids, verify_manifest
from strata.store.pack import decode_payload

OWN_CVD = "this endpoint"  # how the agent's own CVD is named in its error messages
PAYLOAD_OVERHEAD = 64  # a payload's flag byte, or zstd's frame around incompressible data
MAX_PROOF_BYTES = 256 << 20  # raw bytes one proof request makes the server read and hash
_PROOF_CHECKS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="proofs")
_SNAPSHOT_ID = re.compile(r"[0-9a-f]{64}")
# A manifest delta's body: the delta of a manifest of up to MAX_DELTA_BYTES and its record.
MAX_MANIFEST_DELTA_BODY = MAX_DELTA_BYTES + (1 << 16)


def missing_for_admin(ctx: ServerContext, uploader: str, hex_ids: list[str]) -> list[str]:
    """Which of these chunks the server does not hold, for an administrator's capture
    (IT sees the whole store). Opens (or refreshes) the upload session, so a prune
    meanwhile spares what it is about to reference."""
    ids = parse_chunk_ids(hex_ids)
    ctx.touch_upload(uploader)
    return [c.hex() for c in ctx.store.missing_chunks(ids)]




def _head_chunks(ctx: ServerContext, ep: Endpoint) -> frozenset[bytes]:
    """The chunks of the endpoint's head snapshot: what it holds from before the server
    kept holdings (an upgraded server), so that its next commit is not refused."""
    head, _ = snapshots.cached_head(ctx, ep.id)
    return ctx.snapshot_chunks(head) if head else frozenset()


def seed_holdings(ctx: ServerContext, ep: Endpoint) -> None:
    """Once per endpoint: what it held before the server kept holdings."""
    ctx.holdings.seed_once(ep.id, lambda: _head_chunks(ctx, ep))


def possession(ctx: ServerContext, ep: Endpoint, ids: list[bytes]
               ) -> tuple[set[bytes], set[bytes]]:
    """Of `ids` (distinct): those the endpoint holds (its uploads, proofs, snapshots,
    layers) and those it may be told the server holds (shared) but must prove first."""
    recorded, through_layers, shared = _possession(ctx, ep, ids)
    held = recorded | through_layers
    return held, shared - held


def _possession(ctx: ServerContext, ep: Endpoint, ids: list[bytes]
                ) -> tuple[set[bytes], set[bytes], set[bytes]]:
    """`possession`, with what the holdings record apart from what the layers add."""
    seed_holdings(ctx, ep)
    recorded, shared = ctx.holdings.view(ep.id, ids)
    rest = [c for c in ids if c not in recorded]
    # What its layers hold: it may download them, so it holds them.
    through_layers = allowed_chunks(ctx, ep, rest) if rest else set()
    return recorded, through_layers, shared


def _take_queries(ctx: ServerContext, ep: Endpoint, count: int) -> None:
    _take(ctx, ctx.id_queries, ep, count, "chunk queries")


def _take(ctx: ServerContext, limiter: RateLimiter, ep: Endpoint, amount: int,
          what: str) -> None:
    """Spend the endpoint's budget; a refusal is audited (once in a while)."""
    try:
        limiter.take(ep.id, amount, what)
    except TooManyRequests as exc:
        if exc.first:
            audit.record(ctx, f"endpoint:{ep.id}", "rate-limited", what, asked=amount)
        raise


def missing(ctx: ServerContext, ep: Endpoint, hex_ids: list[str]) -> MissingResponse:
    """The endpoint's view of which chunks the server lacks: a chunk held only by other
    endpoints' private data is reported missing exactly like one nobody holds; a shared
    one is to be proven (a keyed hash, not the bytes)."""
    ids = list(dict.fromkeys(parse_chunk_ids(hex_ids)))
    _take_queries(ctx, ep, len(ids))
    ctx.touch_upload(ep.id)
    absent = set(ctx.store.missing_chunks(ids))
    held, shared = possession(ctx, ep, [c for c in ids if c not in absent])
    prove = [c for c in ids if c in shared]
    lacking = [c for c in ids if c not in held and c not in shared]
    return MissingResponse(missing=[c.hex() for c in lacking], prove=[c.hex() for c in prove],
                           nonce=ctx.possession.mint(ep.id) if prove else "")


def prove(ctx: ServerContext, ep: Endpoint, body: bytes) -> ProveResponse:
    """Check the endpoint's keyed hashes of shared chunks (a `model/possession.py` body);
    what it proved it now holds. A refused proof (wrong, or not of a shared chunk) only
    means: upload the bytes."""
    try:
        nonce, claims = decode_proofs(body)
    except CorruptData as exc:
        raise Invalid(str(exc)) from None
    ctx.possession.check(ep.id, nonce)
    _take_queries(ctx, ep, len(claims))
    ctx.touch_upload(ep.id)
    present = ctx.store.present(list(claims))
    held, shared = possession(ctx, ep, list(present))
    # Sizes only of what the endpoint may know exists: summed over others' private chunks,
    # the bound (413 or not) would tell whether the server holds them.
    sizes = ctx.store.raw_sizes(shared)
    if sum(sizes.values()) > MAX_PROOF_BYTES:
        raise TooLarge(f"prove at most {MAX_PROOF_BYTES >> 20} MiB of chunks per request")
    _take(ctx, ctx.proof_bytes, ep, sum(sizes.values()), "bytes to prove")
    def checks_out(cid: bytes) -> bool:
        try:
            raw = ctx.store.load_chunk(cid)  # verified against its id
        except CorruptData:
            return False
        return hmac.compare_digest(proof(nonce, raw), claims[cid])

    # Absent or private chunks get no proof checked ("upload them"). Reading, zstd and
    # BLAKE3 release the GIL: the checks run side by side.
    order = list(shared)
    accepted = [c for c, ok in zip(order, _PROOF_CHECKS.map(checks_out, order), strict=True)
                if ok]
    ctx.holdings.record(ep.id, accepted)
    proven = set(accepted) | held  # held already (a race with its own upload): fine
    refused = [c for c in claims if c not in proven]
    if refused:
        metrics.REJECTED_CHUNKS.inc(len(refused))
        audit.record(ctx, f"endpoint:{ep.id}", "possession-refused", f"{len(refused)} chunks",
                     kind="proof")
    return ProveResponse(accepted=len(proven), refused=[c.hex() for c in refused])


class BundleIntake:
    """One uploaded bundle, taken in as its body arrives (`feed` it in pieces of any
    size): every chunk is checked against its id (and the store's largest chunk size) as
    soon as it is whole, and put into the store before the next piece is read; `settle`
    makes them durable and indexed and records them as the uploader's. A body cut short
    (a dropped connection, a stalled client) or refused at a bad record still keeps
    every chunk that came before: the agent, asking again which chunks are missing, sends
    only the rest. Nothing of a chunk that did not arrive whole, or does not match its
    id, is written. A chunk repeated in the bundle is decoded once.

    The uploader now holds what it sent: what it is told counts only what it had not
    sent before, never what others did. An administrator's upload (`endpoint=False`: a
    layer capture) sees the whole store and holds nothing: a layer's content is shared
    when the layer is saved. Creating one does no I/O (the event loop may)."""

    def __init__(self, ctx: ServerContext, uploader: str, *, endpoint: bool = True):
        self.ctx, self.uploader, self.endpoint = ctx, uploader, endpoint
        limit = ctx.store.config.chunker.max_size
        self._parser = BundleParser(max_raw=limit, max_payload=limit + PAYLOAD_OVERHEAD)
        self._verified: list[tuple[bytes, int, bytes]] = []  # not yet in the store
        self._taken: list[bytes] = []  # in the store (or held by it already)
        self._seen: set[bytes] = set()
        self._failed = False
        self.ended = False  # the whole body arrived and ended between two records
        self.kept = 0  # chunks verified so far: settling makes them durable
        self.stored = self.bytes_stored = 0

    def feed(self, data: bytes) -> None:
        """Take in the next piece of the body and store its whole chunks; Invalid at the
        first bad record, after the chunks before it went into the store. Nothing more
        is taken after that."""
        try:
            self.check(data)
        finally:
            self.store()

    def check(self, data: bytes) -> None:
        """`feed` without the store's I/O: the chunks are verified and held until the
        next `feed`, `store` or `settle` (for the last few bytes of a body, read where a
        thread hand-off would cost more than the check)."""
        if self._failed:
            return
        try:
            fresh = 0
            for cid, raw_length, payload in self._parser.feed(data):
                if cid not in self._seen:
                    decode_payload(cid, payload, raw_length)  # verified by its id
                    self._seen.add(cid)
                    self._verified.append((cid, raw_length, payload))
                    self.kept += 1
                    fresh += 1
            if fresh:
                self._parser.feed(b"")  # a framing error after them, if any
        except CorruptData as exc:
            self._refuse(exc)

    def end(self) -> None:
        """The body ended: Invalid unless it ended between two records."""
        if self._failed:
            return
        try:
            self._parser.close()
        except CorruptData as exc:
            self._refuse(exc)
        self.ended = True

    def _refuse(self, exc: CorruptData) -> None:
        self._failed = True
        metrics.REJECTED_CHUNKS.inc()
        kept = f" ({self.kept} chunks before it were kept)" if self.kept else ""
        raise Invalid(f"upload rejected: {exc}{kept}") from None

    def store(self) -> None:
        """Put the verified chunks into the store (its open pack)."""
        good, self._verified = self._verified, []
        if not good:
            return
        store = self.ctx.store
        if not self._taken:  # a prune meanwhile spares what this upload stores
            self.ctx.touch_upload(self.uploader)
        ids = [cid for cid, _, _ in good]
        before = self.ctx.holdings.view(self.uploader, ids)[0] if self.endpoint else \
            set(ids) - set(store.missing_chunks(ids))
        with store.claimed(ids) as mine:
            for cid, raw_length, payload in good:
                if cid in mine:
                    blob = store.codec.seal(cid, payload)
                    mine.discard(cid)
                    store.put_claimed(cid, blob, raw_length)
                else:
                    metrics.BYTES_DEDUPLICATED.inc(raw_length)
                if cid not in before:
                    self.stored += 1
                    self.bytes_stored += len(payload)
                self._taken.append(cid)

    def settle(self) -> UploadResponse:
        """Store what is verified, make it durable and indexed, then the uploader's: after
        this, it is never asked for again. Called however the body ended."""
        self.store()
        if self._taken:
            self.ctx.store.flush()  # durable and indexed before we acknowledge
            if self.endpoint:
                self.ctx.holdings.record(self.uploader, self._taken)
            if not self.ended:
                metrics.UPLOAD_CHUNKS_KEPT.inc(len(self._taken))
        n = len(self._taken)
        return UploadResponse(chunks=n, stored=self.stored, duplicates=n - self.stored,
                              bytes_stored=self.bytes_stored)


def store_manifest_delta(ctx: ServerContext, ep: Endpoint, base: str,
                         body: bytes) -> ManifestUploadResponse:
    """A manifest the endpoint is about to commit, sent as a delta (strata.engine.delta,
    one `pack_deltas` record) against the manifest of `base`: its own latest snapshot or
    a layer it applied or is assigned (never another endpoint's). Rebuilt within the
    record's declared size, checked against its id, cut and stored like any upload; the
    endpoint holds the chunks. The commit then checks the manifest as it checks any."""
    if not _SNAPSHOT_ID.fullmatch(base):
        raise Invalid("base must be a snapshot id (64 hex digits)")
    try:
        records = list(read_deltas(body))
    except CorruptData as exc:
        raise Invalid(f"manifest delta rejected: {exc}") from None
    if len(records) != 1:
        raise Invalid("send exactly one manifest delta")
    record = records[0]
    if base not in deltas.delta_bases(ctx, ep):
        raise NotFound(f"no snapshot or layer {base[:8]} of this endpoint to patch from")
    if sum(n for _, n in ctx.store.load_snapshot(base).manifest) > MAX_DELTA_BYTES:
        raise TooLarge("that manifest is too large to patch from: send it by chunks")
    ctx.touch_upload(ep.id)
    with ctx.deltas.computing:  # both manifests and a match window in memory
        old = snapshots.manifest_bytes(ctx, base)
        if content_id(old) != record.old_key:
            raise Invalid(f"snapshot {base[:8]}'s manifest is not the one the delta was "
                          "made against: send it by chunks")
        try:
            new = decode(old, record.delta, record.new_size)
        except CorruptData as exc:
            raise Invalid(f"manifest delta rejected: {exc}") from None
    if content_id(new) != record.new_key:
        raise Invalid("manifest delta rejected: the rebuilt manifest does not match its id")
    if not new.startswith(MANIFEST_HEADER):
        raise Invalid("manifest delta rejected: not a Strata manifest")
    store = ctx.store
    pieces: list[bytes | memoryview] = list(store.chunker.cut(new))
    ids = [content_id(p) for p in pieces]
    store.store_chunks(ids, pieces)
    store.flush()  # durable and indexed before we acknowledge
    ctx.holdings.record(ep.id, ids)
    metrics.MANIFEST_DELTAS.inc()
    return ManifestUploadResponse(manifest=[(c.hex(), len(p)) for c, p in zip(ids, pieces,
                                                                              strict=True)],
                                  manifest_id=record.new_key.hex())


def commit(ctx: ServerContext, ep: Endpoint, req: CommitRequest) -> str:
    """Record a snapshot of the endpoint; raises `MissingChunks` (the agent uploads or
    proves them and retries) if it names a chunk the endpoint has not shown it holds,
    whether or not the server has it. Nothing is written before every check passed."""
    # The manifest's own chunks first: reading one the endpoint does not hold would tell
    # it, by how the commit fails, whether someone else does.
    manifest_ids = list(dict.fromkeys(parse_chunk_ids([h for h, _ in req.manifest])))
    held, _ = possession(ctx, ep, manifest_ids)
    if len(held) < len(manifest_ids):
        raise MissingChunks([c for c in manifest_ids if c not in held])
    with ctx.session() as db:
        rules = rules_for(ctx, db, endpoint_family(ep))
    try:
        verified = verify_manifest(ctx.store, req.manifest, req.manifest_id,
                                   shareable=lambda path: shareable_path(rules, path))
    except CorruptData as exc:
        raise Invalid(f"commit rejected: {exc}") from None
    referenced = list(verified.referenced)
    recorded, through_layers, _ = _possession(ctx, ep, referenced)
    unproven = [c for c in referenced if c not in recorded and c not in through_layers]
    if unproven:
        if ctx.store.raw_sizes(unproven):  # named chunks the server holds for others
            audit.record(ctx, f"endpoint:{ep.id}", "possession-refused",
                         f"{len(unproven)} chunks", kind="commit")
        raise MissingChunks(unproven)
    try:
        with ctx.session() as db:
            cvd = snapshots.cvd_of(db, ep.id)
            assert cvd is not None
            parent = cvd.last_snapshot
        snap = Snapshot(time=now_iso(), host=ep.id, paths=req.paths, tags=req.tags,
                        trigger=req.trigger, manifest=req.manifest,
                        manifest_id=req.manifest_id, stats=req.stats, parent=parent)
        sid = ctx.store.commit_snapshot(snap, verified.referenced)
    except CorruptData as exc:
        raise Invalid(f"commit rejected: {exc}") from None
    # A later snapshot may name them again. What its layers hold is not recorded for each
    # endpoint (a fleet on one base would repeat the base's chunks per endpoint): should
    # the layer go, the next commit naming them asks the endpoint to prove them (shared).
    ctx.holdings.record(ep.id, [c for c in referenced
                                if c not in recorded and c not in through_layers])
    ctx.holdings.share(verified.shareable)
    _record_commit(ctx, ep, req, sid, snap.datetime)
    ctx.end_upload(ep.id)
    snapshots.uncache_head(ctx, ep.id)
    metrics.SNAPSHOTS.inc()
    audit.record(ctx, f"endpoint:{ep.id}", "commit-snapshot", sid, trigger=req.trigger)
    return sid


def _record_commit(ctx: ServerContext, ep: Endpoint, req: CommitRequest, sid: str,
                   time: datetime) -> None:
    """The catalog's side of a commit: the snapshot row, the CVD's head, the transaction."""
    stats = req.stats
    with ctx.write() as db:
        cvd = snapshots.cvd_of(db, ep.id)
        assert cvd is not None
        if db.get(SnapshotRecord, sid) is None:
            assignment = db.get(Assignment, ep.id)
            db.add(SnapshotRecord(id=sid, cvd_id=cvd.id, time=time, trigger=req.trigger,
                                  files=int(stats.get("files", 0)),
                                  bytes_total=int(stats.get("bytes_total", 0)),
                                  bytes_new=int(stats.get("bytes_new", 0)), tags=req.tags,
                                  layers=list(assignment.applied_layers) if assignment else []))
        cvd.last_snapshot = sid
        finished = datetime.now(UTC)
        db.add(Transaction(endpoint_id=ep.id, kind=req.kind, finished=finished,
                           started=finished - timedelta(seconds=max(0.0, req.seconds)),
                           snapshot=sid,
                           files_changed=int(stats.get("files_new", 0))
                           + int(stats.get("files_changed", 0)),
                           bytes_before_dedup=int(stats.get("bytes_read", 0)),
                           bytes_after_dedup=int(stats.get("bytes_new", 0)),
                           bytes_on_wire=req.bytes_on_wire, seconds=req.seconds, result="ok",
                           retries=req.retries))


def list_snapshots(ctx: ServerContext, ep: Endpoint) -> list[SnapshotSummary]:
    with ctx.session() as db:
        return [SnapshotSummary(id=s.id, time=s.time, trigger=s.trigger, files=s.files,
                                bytes_total=s.bytes_total, bytes_new=s.bytes_new, tags=s.tags)
                for s in snapshots.cvd_snapshots(db, ep.id)]


def own_snapshot(ctx: ServerContext, ep: Endpoint, ref: str) -> str:
    with ctx.session() as db:
        return snapshots.find_snapshot(db, ep.id, ref, owner=OWN_CVD).id


def snapshot_manifest(ctx: ServerContext, ep: Endpoint, ref: str) -> tuple[str, bytes]:
    """The id and manifest of one of the endpoint's own snapshots."""
    sid = own_snapshot(ctx, ep, ref)
    return sid, snapshots.manifest_bytes(ctx, sid)


def snapshot_chunks(ctx: ServerContext, ep: Endpoint, ref: str, hex_ids: list[str]) -> bytes:
    """Chunks of one of the endpoint's own snapshots, as a bundle of verified payloads."""
    return snapshots.chunk_bundle(ctx, own_snapshot(ctx, ep, ref), hex_ids)


def report_restore(ctx: ServerContext, ep: Endpoint, report: RestoreReport) -> None:
    """The agent's account of a file restore, for the transaction log."""
    sid = own_snapshot(ctx, ep, report.snapshot)
    with ctx.write() as db:
        finished = datetime.now(UTC)
        db.add(Transaction(endpoint_id=ep.id, kind="restore", finished=finished,
                           started=finished - timedelta(seconds=max(0.0, report.seconds)),
                           snapshot=sid, files_changed=report.files,
                           bytes_before_dedup=report.bytes_written,
                           bytes_on_wire=report.bytes_on_wire, seconds=report.seconds,
                           result=report.result, error=report.error))
    audit.record(ctx, f"endpoint:{ep.id}", "restore", sid, files=report.files,
                 result=report.result)


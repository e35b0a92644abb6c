"""A CVD's snapshots: the one lookup of a snapshot an administrator or the endpoint
itself names (`latest`, a unique id prefix or the full id, always within one CVD), the
CVD's head, and reading a snapshot's manifest back from the store."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from strata.errors import (
    Conflict,
    CorruptData,
    Forbidden,
    Invalid,
    NotFound,
    SnapshotNotFound,
    TooLarge,
)
from strata.model.entry import Entry
from strata.model.transfer import MAX_STREAM_BYTES, BundleWriter
from strata.server.catalog.models import Cvd, SnapshotRecord
from strata.server.context import ServerContext
from strata.server.services.manifests import parse_chunk_ids


def cvd_of(db: Session, endpoint_id: str) -> Cvd | None:
    return db.scalar(select(Cvd).where(Cvd.endpoint_id == endpoint_id))


def cvd_snapshots(db: Session, endpoint_id: str) -> list[SnapshotRecord]:
    """The CVD's snapshots, oldest first."""
    cvd = cvd_of(db, endpoint_id)
    if cvd is None:
        return []
    return list(db.scalars(select(SnapshotRecord).where(SnapshotRecord.cvd_id == cvd.id)
                           .order_by(SnapshotRecord.time)))


def find_snapshot(db: Session, endpoint_id: str, ref: str,
                  owner: str = "") -> SnapshotRecord:
    """The snapshot `ref` names in the endpoint's CVD: `latest` (or nothing) for its
    newest, else a unique prefix of its id. A snapshot of another CVD is reported exactly
    like one that does not exist. `owner` names the CVD in messages."""
    owner = owner or f"endpoint {endpoint_id[:8]}"
    cvd = cvd_of(db, endpoint_id)
    newest = db.scalar(select(SnapshotRecord).where(SnapshotRecord.cvd_id == cvd.id)
                       .order_by(SnapshotRecord.time.desc()).limit(1)) if cvd else None
    if newest is None:
        raise Conflict(f"{owner} has not centralized yet")
    if ref in ("", "latest"):
        return newest
    assert cvd is not None
    hits = list(db.scalars(select(SnapshotRecord).where(
        SnapshotRecord.cvd_id == cvd.id,
        SnapshotRecord.id.startswith(ref.lower(), autoescape=True)).limit(2)))
    if len(hits) > 1:  # both in this CVD: saying so reveals nothing of another's
        raise Invalid(f"snapshot {ref!r} of {owner} is ambiguous: give more characters")
    if not hits:
        raise NotFound(f"no snapshot {ref!r} of {owner}")
    return hits[0]


def head_snapshot(db: Session, endpoint_id: str) -> SnapshotRecord | None:
    """The snapshot the endpoint's tree now stands at (none after a provisioning, until
    the fresh CVD's first snapshot)."""
    cvd = cvd_of(db, endpoint_id)
    if cvd is None or cvd.last_snapshot is None:
        return None
    return db.get(SnapshotRecord, cvd.last_snapshot)


def cached_head(ctx: ServerContext, endpoint_id: str) -> tuple[str | None, datetime | None]:
    """The head's id and time, as every check-in reports them (cached; a commit uncaches)."""
    def load() -> tuple[str | None, datetime | None]:
        with ctx.session() as db:
            head = head_snapshot(db, endpoint_id)
            return (head.id, head.time) if head else (None, None)
    return ctx.cached(head_key(endpoint_id), load)


def head_key(endpoint_id: str) -> str:
    """The cache key of the endpoint's head (filled by a credential lookup too)."""
    return f"last:{endpoint_id}"


def uncache_head(ctx: ServerContext, endpoint_id: str) -> None:
    ctx.uncache(head_key(endpoint_id))


def entries(ctx: ServerContext, sid: str) -> Iterator[Entry]:
    """The entries of a stored snapshot's (or layer's) manifest, decoded as they stream."""
    return ctx.store.iter_manifest(ctx.store.load_snapshot(sid))


def manifest_bytes(ctx: ServerContext, sid: str, what: str = "snapshot") -> bytes:
    """A stored snapshot's manifest as stored (each chunk verified against its id)."""
    try:
        snap = ctx.store.load_snapshot(sid)
        return b"".join(ctx.store.load_chunk(c) for c in snap.manifest_chunk_ids())
    except (SnapshotNotFound, CorruptData) as exc:
        raise CorruptData(f"{what} {sid[:8]} cannot be read: {exc}") from None


def batch_sizes(ctx: ServerContext, ids: list[bytes]) -> tuple[int, int]:
    """(stored, raw) bytes of a batch of chunks to stream, from the store's index before
    any is read; TooLarge past MAX_STREAM_BYTES raw."""
    stored, raw = ctx.store.stored_and_raw(ids)
    if raw > MAX_STREAM_BYTES:
        raise TooLarge(f"ask for at most {MAX_STREAM_BYTES} bytes of chunks per request")
    return stored, raw


def chunk_bundle(ctx: ServerContext, sid: str, hex_ids: list[str]) -> bytes:
    """Chunks of a stored snapshot, as a bundle of payloads verified on the way out; a
    chunk that snapshot does not reference is refused, whoever else holds it."""
    allowed = ctx.snapshot_chunks(sid)
    ids = list(dict.fromkeys(parse_chunk_ids(hex_ids)))  # a repeat is sent once
    if any(c not in allowed for c in ids):
        raise Forbidden("a requested chunk is not part of this snapshot")
    batch_sizes(ctx, ids)  # the bound, known before any chunk is read
    out = BundleWriter()
    for cid in ids:
        payload, raw_length = ctx.store.load_payload(cid)
        out.add(cid, raw_length, payload)
    return out.getvalue()

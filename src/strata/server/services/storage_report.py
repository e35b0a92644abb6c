"""Storage per CVD: what its snapshots name (logical bytes, from the catalog), what only
it references in the store (unique bytes: what deleting it would free), and that
unique part's share of the store.

Unique bytes need every snapshot's manifest, so the report is computed in the background
(services/background_report.py) at most every REPORT_SECONDS; pages show the last one
with its time. Memory: one dict entry per distinct chunk (~100 bytes), e.g. 1.6 GB for
16 million chunks (1 TiB of unique data at 64 KiB chunks)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

from sqlalchemy import func, select

from strata.errors import CorruptData, SnapshotNotFound
from strata.model.software import CvdStorage, StorageReport
from strata.server.catalog.models import Cvd, Endpoint, Layer, SnapshotRecord
from strata.server.context import ServerContext
from strata.server.services.background_report import BackgroundReport, report_for

REPORT_SECONDS = 600.0
_SHARED = -1  # referenced by more than one CVD, or by a layer


def _snapshot_chunks(ctx: ServerContext, sid: str) -> set[bytes]:
    snap = ctx.store.load_snapshot(sid)
    ids = set(snap.manifest_chunk_ids())
    for entry in ctx.store.iter_manifest(snap):
        ids.update(c for c, _ in entry.chunks)
    return ids


def compute_storage_report(ctx: ServerContext) -> StorageReport:
    with ctx.session() as db:
        cvds = db.execute(
            select(Cvd.id, Cvd.endpoint_id, Endpoint.hostname, func.count(SnapshotRecord.id),
                   func.coalesce(func.sum(SnapshotRecord.bytes_total), 0))
            .join(Endpoint, Endpoint.id == Cvd.endpoint_id)
            .outerjoin(SnapshotRecord, SnapshotRecord.cvd_id == Cvd.id)
            .group_by(Cvd.id, Cvd.endpoint_id, Endpoint.hostname)).all()
        snaps = db.execute(select(SnapshotRecord.id, SnapshotRecord.cvd_id)).all()
        layers = list(db.scalars(select(Layer.snapshot)))
    owner: dict[bytes, int] = {}
    for sid, cvd in snaps:
        try:
            chunks = _snapshot_chunks(ctx, sid)
        except (SnapshotNotFound, CorruptData):
            continue  # a catalog row whose snapshot is gone (`store check` reports it)
        for c in chunks:
            was = owner.get(c)
            if was is None:
                owner[c] = cvd
            elif was != cvd:
                owner[c] = _SHARED
    for sid in layers:  # IT content is the layers', not any one CVD's
        try:
            owner.update(dict.fromkeys(_snapshot_chunks(ctx, sid), _SHARED))
        except (SnapshotNotFound, CorruptData):
            continue
    unique_stored: dict[int, int] = defaultdict(int)
    unique_raw: dict[int, int] = defaultdict(int)
    store_bytes = 0
    for cid, _pack, length, raw in ctx.store.index.iter_chunks():
        store_bytes += length
        who = owner.get(cid, _SHARED)
        if who != _SHARED:
            unique_stored[who] += length
            unique_raw[who] += raw
    rows = [CvdStorage(endpoint=eid, hostname=host, snapshots=n, logical_bytes=int(logical),
                       unique_bytes=unique_raw[cid], unique_stored_bytes=unique_stored[cid],
                       share=round(100.0 * unique_stored[cid] / store_bytes, 2)
                       if store_bytes else 0.0)
            for cid, eid, host, n, logical in cvds]
    rows.sort(key=lambda r: (-r.unique_stored_bytes, -r.logical_bytes, r.hostname))
    return StorageReport(cvds=rows, store_bytes=store_bytes,
                         computed_at=datetime.now(UTC))


def storage_report_of(ctx: ServerContext) -> BackgroundReport[StorageReport]:
    return report_for(ctx, "storage", lambda: compute_storage_report(ctx), REPORT_SECONDS)

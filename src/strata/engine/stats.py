"""Storage figures: what the snapshots hold against what the store keeps on disk."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from strata.store.repository import Store


@dataclass
class StoreStats:
    snapshots: int
    logical_bytes: int  # sum of every snapshot's file sizes: the cost without any dedup
    unique_bytes: int  # raw size of the distinct chunks kept
    stored_bytes: int  # pack bytes on disk (after compression, encryption, framing)
    chunks: int
    packs: int
    dedup_ratio: float  # logical / unique
    compression_ratio: float  # unique / stored
    space_saving_ratio: float  # logical / stored

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def store_stats(store: Store) -> StoreStats:
    snaps = store.snapshots()
    logical = sum(int(s.stats.get("bytes_total", 0)) for s in snaps)
    chunks, _, unique = store.index.totals()
    packs = store.index.packs()
    stored = sum(packs.values())
    return StoreStats(snapshots=len(snaps), logical_bytes=logical, unique_bytes=unique,
                      stored_bytes=stored, chunks=chunks, packs=len(packs),
                      dedup_ratio=round(logical / unique, 3) if unique else 0.0,
                      compression_ratio=round(unique / stored, 3) if stored else 0.0,
                      space_saving_ratio=round(logical / stored, 3) if stored else 0.0)

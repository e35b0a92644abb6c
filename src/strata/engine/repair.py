"""Repair: heal a store whose packs are damaged, as far as the data allows.

Every indexed pack is read and each chunk verified against its id (as `check
--read-data`). From a damaged pack, the chunks that still verify are copied into a new
pack; then the damaged pack leaves the index and the store, in that order, under the
commit lock (as prune deletes). The chunks that did not verify are then simply absent:
the next backup of a source that still has them stores them again (a backup dedups only
against indexed chunks, and its commit re-stores from the source any chunk it reused
that is gone), which makes every snapshot that needed them whole again. What no source
can give back is reported: the snapshots and files that need lost chunks.

Repair and prune exclude each other (the same lock); backups may run beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from strata.errors import CorruptData
from strata.store.backend import ObjectNotFound
from strata.store.pack import PackWriter
from strata.store.repository import Store

from .check import CheckResult, check_snapshots, verify_pack


@dataclass
class DamagedPack:
    pack: str
    reason: str
    salvaged: int = 0  # intact chunks copied into a new pack
    lost: int = 0  # chunks that failed verification (or a missing pack's all)


@dataclass
class RepairResult:
    dry_run: bool
    packs_checked: int = 0
    damaged: list[DamagedPack] = field(default_factory=list)
    new_packs: int = 0
    chunks_lost: int = 0
    # Snapshots still needing lost chunks, each {snapshot, files: [...], count}: whole
    # again once a backup of a source that has those files stores them.
    hurt: list[dict[str, Any]] = field(default_factory=list)
    damaged_snapshots: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def whole(self) -> bool:
        return not (self.hurt or self.damaged_snapshots)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "whole": self.whole}


def repair(store: Store, *, dry_run: bool = False,
           on_pack: Callable[[int], None] | None = None) -> RepairResult:
    """Find damaged packs, keep what verifies, drop the rest from the store; report what
    snapshots lost (see the module's docstring). `on_pack(size)` after each pack read."""
    started = time.monotonic()
    result = RepairResult(dry_run=dry_run)
    with store.coordination.exclusive("prune", what="repair or prune"), \
            store.session("repair"):
        store.reconcile_index()
        bad_chunks: dict[str, set[bytes]] = {}
        for name, size in sorted(store.index.packs().items()):
            result.packs_checked += 1
            reason, bad = verify_pack(store, name, size)
            if on_pack:
                on_pack(size)
            if reason:
                result.damaged.append(DamagedPack(name, reason, lost=len(bad)))
                bad_chunks[name] = bad
        result.chunks_lost = sum(len(b) for b in bad_chunks.values())
        if dry_run:
            for d in result.damaged:
                d.salvaged = len(store.index.pack_chunks(d.pack)) - d.lost
        elif result.damaged:
            _salvage(store, result, bad_chunks)
    # What snapshots name that the index lacks now (or, in a dry run, will lack).
    after = CheckResult()
    lost = set().union(*bad_chunks.values()) if dry_run and bad_chunks else set()
    check_snapshots(store, lost, after)
    result.hurt, result.damaged_snapshots = after.hurt, after.damaged_snapshots
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _salvage(store: Store, result: RepairResult, bad_chunks: dict[str, set[bytes]]) -> None:
    writer = store.new_pack_writer()

    def install(w: PackWriter) -> None:
        store.install_pack(w, move=True)
        result.new_packs += 1

    for d in result.damaged:
        try:
            data = store.backend.load("packs", d.pack)
        except (ObjectNotFound, OSError):
            continue  # missing or unreadable: nothing to salvage
        for e in store.index.pack_chunks(d.pack):
            if e.id in bad_chunks[d.pack]:
                continue
            blob = data[e.offset:e.offset + e.length]
            try:
                store.codec.decode(e.id, blob, e.raw_length)  # never copy damage forward
            except CorruptData:
                d.lost += 1
                continue
            writer.add(e.id, blob, e.raw_length)
            d.salvaged += 1
            if writer.size >= store.config.pack_size:
                install(writer)
                writer = store.new_pack_writer()
    if writer.entries:
        install(writer)
    else:
        writer.discard()
    names = sorted(d.pack for d in result.damaged)
    # Out of the index first, then out of the store, under the commit lock: a reconcile
    # must never index a damaged pack again (its trailer may well still read).
    with store.commit_lock():
        store.index.drop_packs(names)
        store.backend.remove_many("packs", names)
    result.chunks_lost = sum(d.lost for d in result.damaged)

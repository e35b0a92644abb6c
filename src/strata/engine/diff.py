"""Diff two snapshots by walking their manifests side by side in tree order."""

from __future__ import annotations

from collections.abc import Iterator

from strata.model.entry import Entry
from strata.model.snapshot import Snapshot
from strata.store.repository import Store
from strata.tree.order import path_key


def _meta(e: Entry) -> tuple:
    return (e.mode, e.uid, e.gid, e.mtime_ns, e.xattrs, e.link_target, e.rdev)


def diff_entries(a: Iterator[Entry], b: Iterator[Entry]) -> Iterator[tuple[str, Entry]]:
    """Yield ('+', e) added, ('-', e) removed, ('M', e) content or type changed,
    ('U', e) metadata only, for two manifests in tree order."""
    ea, eb = next(a, None), next(b, None)
    while ea is not None or eb is not None:
        if eb is None or (ea is not None and path_key(ea.path) < path_key(eb.path)):
            yield "-", ea  # type: ignore[misc]
            ea = next(a, None)
        elif ea is None or path_key(eb.path) < path_key(ea.path):
            yield "+", eb
            eb = next(b, None)
        else:
            if ea.type != eb.type or ea.content_hash != eb.content_hash or ea.size != eb.size:
                yield "M", eb
            elif _meta(ea) != _meta(eb):
                yield "U", eb
            ea, eb = next(a, None), next(b, None)


def diff_snapshots(store: Store, a: Snapshot, b: Snapshot) -> Iterator[tuple[str, Entry]]:
    return diff_entries(store.iter_manifest(a), store.iter_manifest(b))

"""Capturing layers: what of a reference machine's tree becomes a layer."""

from __future__ import annotations

from collections.abc import Iterable

from strata.engine.diff import diff_entries
from strata.layers.image import LayerContent
from strata.model.entry import Entry, EntryType
from strata.tree.order import path_key


def app_difference(before: Iterable[Entry], after: Iterable[Entry]
                   ) -> tuple[list[Entry], list[bytes]]:
    """What installing an application did: the entries it added or changed (with the
    directories above them, so the layer can be laid down on its own) and what it removed."""
    after_list = list(after)
    by_path = {e.path: e for e in after_list}
    keep: dict[bytes, Entry] = {}
    removed: list[bytes] = []
    for op, e in diff_entries(iter(before), iter(after_list)):
        if op == "-":
            if not any(e.path.startswith(r + b"/") for r in removed[-1:]):
                removed.append(e.path)
            continue
        keep[e.path] = e
        parent = e.path
        while b"/" in parent:
            parent = parent.rpartition(b"/")[0]
            if parent in keep or parent not in by_path:
                break
            keep[parent] = by_path[parent]
    return sorted(keep.values(), key=lambda e: path_key(e.path)), removed


def without_layers(entries: Iterable[Entry], base: Iterable[Entry] | None,
                   layers: list[LayerContent]) -> list[Entry]:
    """A reference machine's tree without what the driver and app `layers` applied there
    put in it, so that a capture from a managed endpoint does not take them in: their
    files go, or go back to the `base` layer's version where the base has the path (an
    app that replaced a base file); what an app removed from the base comes back; their
    directories go unless something else lives in them."""
    laid: set[bytes] = set()
    for layer in layers:
        laid.update(e.path for e in layer.entries)
    base_map = {e.path: e for e in base} if base is not None else {}
    out: dict[bytes, Entry] = {}
    candidates: list[bytes] = []  # directories a layer carries and the base does not
    for e in entries:
        if e.path not in laid:
            out[e.path] = e
        elif e.path in base_map:
            out[e.path] = base_map[e.path]
        elif e.type is EntryType.DIR:
            candidates.append(e.path)
            out[e.path] = e
    for layer in layers:
        for gone in layer.removes:
            for p, e in base_map.items():
                if (p == gone or p.startswith(gone + b"/")) and p not in out:
                    out[p] = e
    needed: set[bytes] = set()
    dropped = set(candidates)
    for p in out:
        if p in dropped:
            continue
        while b"/" in p:
            p = p.rpartition(b"/")[0]
            if p in needed:
                break
            needed.add(p)
    for d in dropped - needed:
        del out[d]
    return sorted(out.values(), key=lambda e: path_key(e.path))

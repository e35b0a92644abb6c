"""Capturing layers: what of a reference machine's tree becomes a layer."""

from __future__ import annotations

from collections.abc import Iterable

from strata.engine.diff import diff_entries
from strata.model.entry import Entry
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

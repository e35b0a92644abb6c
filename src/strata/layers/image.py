"""The image of an endpoint's IT layers: base, then drivers, then apps, merged into one
path -> entry map, with the layer each path came from.

Layer rules apply here too: whatever a layer's manifest says, an image never carries
identity, user data or paths that belong to no layer (a crafted or careless layer cannot
reach them). Hardlinks become copies of their first name: a later layer may replace one
name and not the other, and the endpoint must not end up with a link into the old file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from strata.layers.rules import LayerRules
from strata.model.entry import Entry, EntryType
from strata.tree.order import path_key

KIND_ORDER = {"base": 0, "driver": 1, "app": 2, "snapshot": 0}


@dataclass
class LayerContent:
    label: str  # "base debian:12", shown in plans and compliance reports
    kind: str  # base, driver, app (or snapshot: a CVD snapshot used as a system image)
    entries: Iterable[Entry]
    removes: list[bytes] = field(default_factory=list)  # paths an app layer deletes


@dataclass
class Image:
    entries: dict[bytes, Entry] = field(default_factory=dict)
    source: dict[bytes, str] = field(default_factory=dict)  # path -> layer label
    removes: set[bytes] = field(default_factory=set)
    # Paths whose entry is the endpoint's own, from a CVD snapshot (revert, full restore):
    # layer rules about IT content (do-not-download) do not apply to them.
    own: set[bytes] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.entries)

    def sorted_entries(self) -> Iterator[Entry]:
        for p in sorted(self.entries, key=path_key):
            yield self.entries[p]

    def labels(self) -> list[str]:
        return list(dict.fromkeys(self.source.values()))


def resolve_hardlinks(entries: Iterable[Entry]) -> Iterator[Entry]:
    """Yield entries with every HARDLINK turned into a copy of its first name (a FILE).
    A hardlink names its first name by path (the manifest's `link_target`), never by
    inode: manifests that leave a machine carry no inode numbers."""
    firsts: dict[bytes, Entry] = {}
    for e in entries:
        if e.type is EntryType.FILE:
            firsts[e.path] = e
        elif e.type is EntryType.HARDLINK:
            first = firsts.get(e.link_target)
            if first is None:
                continue  # dangling in a crafted manifest: nothing to copy
            e = dataclasses.replace(first, path=e.path, xattrs=dict(first.xattrs))
        yield e


def build_image(layers: Iterable[LayerContent], rules: LayerRules,
                full: bool = False) -> Image:
    """Merge layers in order (base, drivers, apps: sort before calling). With `full` (a
    whole-CVD restore) identity and user data are part of the image too."""
    img = Image()
    for layer in layers:
        for e in resolve_hardlinks(layer.entries):
            cls_ok = rules.layer_may_carry(e.path, e.type is EntryType.DIR) or (
                full and not rules.never(e.path, e.type is EntryType.DIR))
            if cls_ok:
                img.entries[e.path] = e
                img.source[e.path] = layer.label
                if layer.kind == "snapshot":
                    img.own.add(e.path)
                else:
                    img.own.discard(e.path)
        for gone in layer.removes:
            img.removes.add(gone)
            for p in [p for p in img.entries if p == gone or p.startswith(gone + b"/")]:
                del img.entries[p]
                del img.source[p]
                img.own.discard(p)
    return img

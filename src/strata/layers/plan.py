"""The merge plan: what turns an endpoint's current tree into its target tree.

Target = the IT layers' image, with the endpoint's own layers on top: identity and user
data are never touched, user-installed applications stay, and paths the previous image
put there but the new one lacks go away. The same function serves the agent (the update
it applies), the server (dry-run reports, revert, migration) and compliance repair.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from strata.layers.changes import Action, Change
from strata.layers.image import Image, resolve_hardlinks
from strata.layers.rules import LayerRules, PathClass
from strata.model.entry import Entry, EntryType
from strata.tree.order import path_key
from strata.tree.scan import display

_PROTECTED = frozenset({PathClass.IDENTITY, PathClass.USER_DATA, PathClass.NEVER})


@dataclass(frozen=True)
class Mode:
    """How a plan treats what the image does not cover."""

    # Delete user-installed files the target lacks (revert, provisioning, full restore).
    wipe_unmanaged: bool = False
    # The endpoint's user-installed files win over the target (revert --keep-user-apps).
    keep_user_apps: bool = False
    # Who wins when the user changed a file a layer manages: "layer" or "endpoint".
    conflicts: str = "layer"
    # Classes never touched. A full restore to new hardware lays down identity and user
    # data too, so it protects only what belongs to no layer.
    protect: frozenset[PathClass] = _PROTECTED


@dataclass
class Conflict:
    kind: str  # overwrites-user-app, downgrade, user-modified, kept, disk-space, blocked
    path: str
    detail: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "path": self.path, "detail": self.detail}


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out = {a.value: 0 for a in Action}
        for c in self.changes:
            out[c.action.value] += 1
        return out

    def bytes_to_write(self) -> int:
        return sum(c.entry.size for c in self.changes
                   if c.entry is not None and c.entry.type is EntryType.FILE
                   and c.action in (Action.ADD, Action.REPLACE))

    def chunks_in_order(self) -> dict[bytes, int]:
        """The chunks the plan writes, each once, with their lengths, in the order of the
        tree (changes are sorted by path). Neighbouring files are alike (a package's
        modules, libraries, locale files), so a download stream in this order compresses
        far better than one in id order, which is random."""
        lengths: dict[bytes, int] = {}
        for c in self.changes:
            if c.entry is not None and c.entry.type is EntryType.FILE and \
                    c.action in (Action.ADD, Action.REPLACE):
                for cid, n in c.entry.chunks:
                    lengths.setdefault(cid, n)
        return lengths

    def chunk_ids(self) -> set[bytes]:
        return set(self.chunks_in_order())

    def summary(self, limit: int = 50) -> dict:
        kinds: dict[str, int] = {}
        for c in self.conflicts:
            kinds[c.kind] = kinds.get(c.kind, 0) + 1
        return {"changes": self.counts(), "bytes_to_write": self.bytes_to_write(),
                "conflicts": kinds,
                "conflict_list": [c.to_dict() for c in self.conflicts[:limit]]}


def same_content(a: Entry, b: Entry) -> bool:
    if a.type != b.type:
        return False
    if a.type is EntryType.FILE:
        return a.size == b.size and a.content_hash == b.content_hash
    if a.type is EntryType.SYMLINK:
        return a.link_target == b.link_target
    if a.type in (EntryType.CHARDEV, EntryType.BLOCKDEV):
        return a.rdev == b.rdev
    return True


def same_meta(a: Entry, b: Entry) -> bool:
    if (a.mode, a.uid, a.gid) != (b.mode, b.uid, b.gid) or a.xattrs != b.xattrs:
        return False
    # A directory's mtime moves whenever its contents do: not a difference worth a change.
    # A symlink's does not (lutimes sets it): a link whose time differs from the layer's
    # would read as drift.
    return a.type is EntryType.DIR or a.mtime_ns == b.mtime_ns


def _ancestors(path: bytes) -> Iterable[bytes]:
    while b"/" in path:
        path = path.rpartition(b"/")[0]
        yield path


def plan_update(current: Iterable[Entry], image: Image, rules: LayerRules, *,
                owned: Mapping[bytes, Entry] | None = None, mode: Mode = Mode()) -> Plan:
    """Changes that make `current` (the endpoint's tree, in any order) match `image` by
    the layer rules. `owned` is the image applied before (paths IT layers put there)."""
    owned = owned or {}
    cur = {e.path: e for e in resolve_hardlinks(current)}
    plan = Plan()
    keep: set[bytes] = set()  # paths that stay (kept or written): their parents must too
    deletes: list[Change] = []
    for path in sorted(cur.keys() | image.entries.keys(), key=path_key):
        c, t = cur.get(path), image.entries.get(path)
        is_dir = (t or c).type is EntryType.DIR  # type: ignore[union-attr]
        cls = rules.classify(path, is_dir)
        if cls in mode.protect:
            if c is not None:
                keep.add(path)
            continue
        if t is None:
            assert c is not None
            unmanaged = path not in owned
            if path in image.removes or not unmanaged or (
                    mode.wipe_unmanaged and not mode.keep_user_apps):
                deletes.append(Change(Action.DELETE, path, None, c,
                                      "removed by an app layer" if path in image.removes
                                      else "not in the target image"))
            else:
                keep.add(path)
            continue
        change = _change_for(path, c, t, owned.get(path), cls, rules, mode, image, plan)
        if change is not None:
            plan.changes.append(change)
        if c is not None or change is not None:
            keep.add(path)
    # A directory goes only once nothing that stays is beneath it.
    parents = {a for p in keep for a in _ancestors(p)}
    for ch in [ch for ch in plan.changes if ch.path in parents and ch.old is not None
               and ch.old.type is EntryType.DIR and ch.entry is not None
               and ch.entry.type is not EntryType.DIR]:
        plan.changes.remove(ch)
        plan.conflicts.append(Conflict("blocked", display(ch.path),
                                       "a directory with files that stay cannot become "
                                       f"a {ch.entry.type.name.lower()}"))
    for d in deletes:
        if d.path in parents:
            plan.conflicts.append(Conflict("blocked", display(d.path),
                                           "kept: files that stay are inside it"))
        else:
            plan.changes.append(d)
    plan.changes.sort(key=lambda ch: path_key(ch.path))
    return plan


def _change_for(path: bytes, c: Entry | None, t: Entry, o: Entry | None, cls: PathClass,
                rules: LayerRules, mode: Mode, image: Image, plan: Plan) -> Change | None:
    reason = image.source.get(path, "target")
    shown = display(path)
    if rules.do_not_download(path, t.type is EntryType.DIR):
        return None
    if c is None:
        return Change(Action.ADD, path, t, None, reason)
    if same_content(c, t):
        return None if same_meta(c, t) else Change(Action.META, path, t, c, reason)
    if rules.do_not_override(path, t.type is EntryType.DIR):
        plan.conflicts.append(Conflict("kept", shown, f"do-not-override rule: the endpoint's "
                                                      f"version stays ({reason} not applied)"))
        return None
    if o is None:  # the endpoint has a file here that no layer put there
        if mode.keep_user_apps and cls is PathClass.USER_APP:
            return None
        if c.type is not EntryType.DIR and t.type is not EntryType.DIR:
            if t.mtime_ns < c.mtime_ns and t.type is EntryType.FILE:
                plan.conflicts.append(Conflict("downgrade", shown,
                                               f"{reason} carries an older version"))
            else:
                plan.conflicts.append(Conflict("overwrites-user-app", shown,
                                               f"{reason} replaces a file no layer put there"))
    elif not same_content(c, o):
        if mode.conflicts == "endpoint":
            plan.conflicts.append(Conflict("kept", shown, "changed on the endpoint; the "
                                                          "endpoint's version stays"))
            return None
        plan.conflicts.append(Conflict("user-modified", shown,
                                       f"changed on the endpoint; {reason} wins (the user's "
                                       "version stays in the pre-update snapshot)"))
    return Change(Action.REPLACE, path, t, c, reason)

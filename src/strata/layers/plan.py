"""The merge plan: what turns an endpoint's current tree into its target tree.

Target = the IT layers' image, with the endpoint's own layers on top: identity and user
data are never touched, user-installed applications stay, and paths the previous image
put there but the new one lacks go away. The same function serves the agent (the update
it applies), the server (dry-run reports, revert, migration) and compliance repair.

Configuration (the ``configuration`` layer rule, ``/etc/`` on Linux) follows a three-way
rule, as OSTree's ``/etc`` merge does: with O the entry the previous layers laid down, E
the endpoint's and N the new layers', a file the endpoint changed (E differs from O in
content, type, mode or owner, or E deleted it) is kept and reported as
``local-change-kept``; an untouched one takes N. Without O (no layer put the file there
before: the first assignment to an endpoint) nobody can tell a local edit from a base
change, and the endpoint's version stays too (as dpkg keeps a configuration file it did
not install): assigning the base an endpoint runs changes nothing, and from then on the
rule is three-way. Compliance repair (``--enforce``) and the operations that set an exact
system (revert, provisioning, restore) put N back.

Account databases are merged by key instead (strata.layers.accounts): that needs their
bytes, which a plan does not have, so the plan lists them in ``Plan.merges`` and
strata.layers.config_merge turns each into a change whose content is computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from strata.layers.accounts import database_for
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
    # The three-way rule for configuration: the endpoint's changes stay (updates). Off
    # for compliance repair and for operations that set an exact system.
    keep_local_config: bool = True
    # Account databases merged by key rather than replaced (off for provisioning and a
    # full restore, whose target carries the accounts it needs).
    merge_accounts: bool = True


# Conflicts that hold an update back until someone resolves them (nothing is switched).
HOLDING = frozenset({"account-clash", "accounts-unmergeable"})


@dataclass
class Conflict:
    # overwrites-user-app, downgrade, user-modified, kept, local-change-kept, blocked,
    # accounts-merged, account-clash, accounts-unmergeable, disk-space
    kind: str
    path: str
    detail: str

    @property
    def holds(self) -> bool:
        return self.kind in HOLDING

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "path": self.path, "detail": self.detail}


@dataclass(frozen=True)
class AccountMerge:
    """An account database the endpoint and the new layers both have, with different
    contents: to be merged by key once its bytes are read (strata.layers.config_merge)."""

    path: bytes
    old: Entry | None  # what the previous layers laid down (None: unknown)
    endpoint: Entry
    new: Entry
    reason: str  # the layer it comes from


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    merges: list[AccountMerge] = field(default_factory=list)

    def held(self) -> list[Conflict]:
        """The conflicts that keep this plan from being applied."""
        return [c for c in self.conflicts if c.holds]

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
        far better than one in id order, which is random. Content computed on the
        endpoint (a merge) is no layer's chunks: nothing to download."""
        lengths: dict[bytes, int] = {}
        for c in self.changes:
            if c.entry is not None and c.entry.type is EntryType.FILE and \
                    c.action in (Action.ADD, Action.REPLACE) and c.content is None:
                for cid, n in c.entry.chunks:
                    lengths.setdefault(cid, n)
        return lengths

    def computed_chunks(self) -> dict[bytes, bytes]:
        """The bytes of content computed on the endpoint, by the chunk id its entry names
        (what the data source of the apply serves for it)."""
        return {cid: c.content for c in self.changes if c.content is not None
                and c.entry is not None for cid, _ in c.entry.chunks}

    def chunk_ids(self) -> set[bytes]:
        return set(self.chunks_in_order())

    def summary(self, limit: int = 50) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for c in self.conflicts:
            kinds[c.kind] = kinds.get(c.kind, 0) + 1
        first = sorted(self.conflicts, key=lambda c: not c.holds)  # what holds it, first
        return {"changes": self.counts(), "bytes_to_write": self.bytes_to_write(),
                "conflicts": kinds, "held": len(self.held()),
                "conflict_list": [c.to_dict() for c in first[:limit]]}


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


def locally_changed(o: Entry, c: Entry | None) -> bool:
    """The endpoint changed (or deleted) what the previous layers laid down: content,
    type, mode or owner (not times: touching a file is not editing it)."""
    return c is None or not same_content(c, o) or (c.mode, c.uid, c.gid) != (o.mode, o.uid,
                                                                            o.gid)


def plan_update(current: Iterable[Entry], image: Image, rules: LayerRules, *,
                owned: Mapping[bytes, Entry] | None = None, mode: Mode = Mode()) -> Plan:
    """Changes that make `current` (the endpoint's tree, in any order) match `image` by
    the layer rules. `owned` is the image applied before (paths IT layers put there).
    Account databases to merge are left in `Plan.merges` (strata.layers.config_merge)."""
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
            o = owned.get(path)
            if o is not None and c.type is not EntryType.DIR and path not in image.removes:
                if mode.merge_accounts and database_for(path, rules.family):
                    keep.add(path)  # never left without an account database
                    plan.conflicts.append(Conflict("kept", display(path), "the new layers "
                                                   "have no such account database; the "
                                                   "endpoint's stays"))
                    continue
                if _keeps_local(path, o, c, rules, mode):
                    keep.add(path)
                    plan.conflicts.append(Conflict("local-change-kept", display(path),
                                                   "changed on the endpoint; the new layers "
                                                   "no longer have it, the endpoint's "
                                                   "version stays"))
                    continue
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
    for ch, new_type in [(ch, ch.entry.type) for ch in plan.changes
                         if ch.path in parents and ch.old is not None
                         and ch.old.type is EntryType.DIR and ch.entry is not None
                         and ch.entry.type is not EntryType.DIR]:
        plan.changes.remove(ch)
        plan.conflicts.append(Conflict("blocked", display(ch.path),
                                       "a directory with files that stay cannot become "
                                       f"a {new_type.name.lower()}"))
    for d in deletes:
        if d.path in parents:
            plan.conflicts.append(Conflict("blocked", display(d.path),
                                           "kept: files that stay are inside it"))
        else:
            plan.changes.append(d)
    plan.changes.sort(key=lambda ch: path_key(ch.path))
    return plan


def _keeps_local(path: bytes, o: Entry, c: Entry | None, rules: LayerRules,
                 mode: Mode) -> bool:
    """The three-way rule: configuration the endpoint changed stays the endpoint's."""
    return mode.keep_local_config and o.type is not EntryType.DIR and \
        rules.configuration(path) and locally_changed(o, c)


def _change_for(path: bytes, c: Entry | None, t: Entry, o: Entry | None, cls: PathClass,
                rules: LayerRules, mode: Mode, image: Image, plan: Plan) -> Change | None:
    reason = image.source.get(path, "target")
    shown = display(path)
    if rules.do_not_download(path, t.type is EntryType.DIR) and path not in image.own:
        return None  # a layer's: the endpoint's own files (a CVD snapshot) always come
    if c is None:
        if o is not None and _keeps_local(path, o, c, rules, mode) and \
                database_for(path, rules.family) is None:
            plan.conflicts.append(Conflict("local-change-kept", shown, f"deleted on the "
                                           f"endpoint; it stays deleted ({reason} not "
                                           "applied)"))
            return None
        return Change(Action.ADD, path, t, None, reason)
    if same_content(c, t) and same_meta(c, t):
        return None
    if rules.do_not_override(path, t.type is EntryType.DIR):
        if not same_content(c, t):
            plan.conflicts.append(Conflict("kept", shown, "do-not-override rule: the "
                                           f"endpoint's version stays ({reason} not applied)"))
            return None
        return Change(Action.META, path, t, c, reason)
    if mode.merge_accounts and c.type is EntryType.FILE and t.type is EntryType.FILE and \
            not same_content(c, t) and database_for(path, rules.family) is not None:
        plan.merges.append(AccountMerge(path, o if o is not None and o.type is EntryType.FILE
                                        else None, c, t, reason))
        return None
    if o is not None and _keeps_local(path, o, c, rules, mode):
        if not same_content(o, t) or (o.mode, o.uid, o.gid) != (t.mode, t.uid, t.gid):
            plan.conflicts.append(Conflict("local-change-kept", shown,
                                           f"changed on the endpoint; the endpoint's version "
                                           f"stays ({reason} changes it too, not applied)"))
        return None
    if o is None and mode.keep_local_config and rules.configuration(path) and \
            c.type is not EntryType.DIR and t.type is not EntryType.DIR:
        plan.conflicts.append(Conflict("local-change-kept", shown, "no layer laid it down "
                                       "before, so a local edit cannot be told from a base "
                                       f"change: the endpoint's version stays ({reason} not "
                                       "applied; --enforce applies it)"))
        return None
    if same_content(c, t):
        return Change(Action.META, path, t, c, reason)
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

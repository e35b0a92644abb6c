"""The merge step of a plan: account databases merged by key, whose result is content
computed here, not chunks of any layer.

`plan_update` leaves each account database that the endpoint and the new layers both have
(with different contents) in `Plan.merges`; `resolve_merges` reads the three copies
through `MergeInputs` (the agent: its cache and its own files; the server's dry-run: the
store), merges them (strata.layers.accounts), and turns each into a change whose entry
names the merged bytes as one chunk, with the bytes in `Change.content`. The apply's data
source serves them by that id (`Plan.computed_chunks`), so the journal writes a merged
file like any other, atomically and under the same crash-safety.

A clash, or a copy that cannot be parsed, becomes a holding conflict: nothing of that
database is changed, and the agent does not switch until someone resolves it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

from strata.errors import StrataError
from strata.layers.accounts import (
    MAX_DATABASE_BYTES,
    AccountsUnmergeable,
    database_for,
    merge_database,
)
from strata.layers.changes import Action, Change
from strata.layers.plan import AccountMerge, Conflict, Plan, same_meta
from strata.model.entry import Entry
from strata.model.ids import content_id
from strata.tree.order import path_key
from strata.tree.scan import display


class MergeInputs(Protocol):
    """Where the three copies of an account database come from."""

    def old(self, entry: Entry) -> bytes | None:
        """The old base's copy, or None when it cannot be had (a two-way merge follows)."""

    def endpoint(self, entry: Entry) -> bytes:
        """The endpoint's copy as it is now."""

    def new(self, entry: Entry) -> bytes:
        """The new layers' copy."""


def resolve_merges(plan: Plan, inputs: MergeInputs, family: str, now_ns: int) -> None:
    """Turn `plan.merges` into changes (or holding conflicts). `now_ns` is the mtime of a
    merged file: it was written now, and a cache keyed on mtime (nscd) must see it."""
    for m in plan.merges:
        fmt = database_for(m.path, family)
        assert fmt is not None
        shown = display(m.path)
        try:
            big = [e for e in (m.old, m.endpoint, m.new) if e is not None
                   and e.size > MAX_DATABASE_BYTES]
            if big:
                raise AccountsUnmergeable(f"a copy of {big[0].size} bytes is more than the "
                                          f"{MAX_DATABASE_BYTES} a merge reads")
            new = inputs.new(m.new)
            try:
                endpoint = inputs.endpoint(m.endpoint)
            except OSError as exc:
                raise AccountsUnmergeable(f"the endpoint's copy cannot be read "
                                          f"({exc.strerror or exc})") from None
            old = inputs.old(m.old) if m.old is not None else None
            if old is not None and content_id(old) != m.old.content_hash:  # type: ignore[union-attr]
                old = None  # not what the old layers laid down: do without it
            result = merge_database(fmt, old, endpoint, new)
        except AccountsUnmergeable as exc:
            plan.conflicts.append(Conflict("accounts-unmergeable", shown,
                                           f"{exc}; the update waits until it is fixed"))
            continue
        if result.clashes:
            for clash in result.clashes:
                plan.conflicts.append(Conflict("account-clash", shown,
                                               f"{clash}; the update waits until one of "
                                               "them is renumbered or renamed"))
            continue
        how = "" if old is not None else \
            " (two-way: the old base's copy is unknown, so every local record is kept)"
        plan.conflicts.append(Conflict("accounts-merged", shown, result.describe() + how))
        change = merged_change(m, result.content, endpoint, now_ns)
        if change is not None:
            plan.changes.append(change)
    plan.merges = []
    plan.changes.sort(key=lambda ch: path_key(ch.path))


def merged_change(m: AccountMerge, content: bytes, endpoint: bytes,
                  now_ns: int) -> Change | None:
    """The change that lays down merged `content` with the new layers' mode, owner and
    extended attributes (shadow's 0640 root:shadow comes from the base)."""
    reason = f"{m.reason}, merged with the endpoint's accounts"
    cid = content_id(content)
    if cid == content_id(endpoint):
        same = dataclasses.replace(m.new, size=m.endpoint.size,
                                   content_hash=m.endpoint.content_hash,
                                   chunks=list(m.endpoint.chunks), mtime_ns=m.endpoint.mtime_ns)
        return None if same_meta(m.endpoint, same) else \
            Change(Action.META, m.path, same, m.endpoint, reason)
    entry = dataclasses.replace(m.new, size=len(content), content_hash=cid,
                                chunks=[(cid, len(content))] if content else [],
                                mtime_ns=now_ns, sparse=False, xattrs=dict(m.new.xattrs),
                                ctime_ns=0, inode=0, dev=0)
    return Change(Action.REPLACE, m.path, entry, m.endpoint, reason, content=content)


def require_no_holds(plan: Plan) -> None:
    """Raise the plain reason an update is held (account clashes, unmergeable databases)."""
    held = plan.held()
    if held:
        raise UpdateHeld("update held: " + "; ".join(f"{c.path}: {c.detail}" for c in held))


class UpdateHeld(StrataError):
    """Something only a person can decide stands in the update's way; nothing switched."""


class StoreInputs:
    """All three copies from one content-addressed store, where the layers and the
    endpoint's snapshots share their chunks (the server's dry-run). Each chunk is
    verified against its id on load."""

    def __init__(self, load_chunk: Callable[[bytes], bytes]):
        self.load_chunk = load_chunk

    def _read(self, entry: Entry) -> bytes:
        return b"".join(self.load_chunk(cid) for cid, _ in entry.chunks)

    def old(self, entry: Entry) -> bytes | None:
        try:
            return self._read(entry)
        except StrataError:
            return None

    def endpoint(self, entry: Entry) -> bytes:
        return self._read(entry)

    def new(self, entry: Entry) -> bytes:
        return self._read(entry)

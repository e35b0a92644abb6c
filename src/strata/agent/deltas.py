"""Changed files of a layer update rebuilt from the endpoint's own older copies plus deltas
from the server (strata.engine.delta), instead of downloading their chunks.

A file is tried when the endpoint holds an older version of it: at the same path (the
plan's replaced entry; where that was a symlink, the file it pointed to), or, for a file
the update adds, its predecessor: a file of the current tree whose path differs only in
its version numbers (libssl.so.1.1 -> libssl.so.3, python3.9/ -> python3.11/), else whose
name alone does. Such files travel in groups (see strata.engine.delta). Whatever goes
wrong (the server sends no delta because it does not pay, a local copy is not the content
the delta was made against, the delta does not rebuild the files' content hashes) only
means the group's chunks are downloaded as before. A rebuilt file counts as downloaded
once its chunks are in the cache, each verified against its id.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from strata.agent.client import ServerClient, parse_answer
from strata.agent.reflector_source import ReflectorFetcher
from strata.engine.delta import (
    MAX_DELTA_BYTES,
    GroupDelta,
    closes_group,
    decode,
    group_key,
    read_deltas,
    worth_trying,
)
from strata.errors import CorruptData, StrataError
from strata.layers.changes import Action
from strata.layers.plan import Plan
from strata.model.entry import Entry, EntryType
from strata.model.ids import content_id
from strata.model.reflector import MAX_OFFERED, DeltaOffer
from strata.model.wire import MAX_DELTA_FILES, DesiredLayer
from strata.store.backend import atomic_write
from strata.store.repository import Store
from strata.tree.scan import open_path

# New bytes per request (what the server accepts): some 16 s of its CPU when none is
# cached (level 19), well inside the client's timeout; a larger group goes alone.
BATCH_BYTES = 16 << 20
_SNAPSHOT_ID = re.compile(r"[0-9a-f]{64}")
_DIGITS = re.compile(rb"\d+(?:\.\d+)*")  # a version: 3, 1.1, 2.36


@dataclass(frozen=True)
class Candidate:
    old: Entry  # the endpoint's version (its path, size and content hash)
    new: Entry  # the layer's
    lacking: int  # bytes of the new file's chunks neither cache nor endpoint holds


@dataclass
class DeltaStats:
    asked: int = 0  # files a delta was asked for
    rebuilt: int = 0  # files rebuilt from a delta (their chunks now in the cache)
    bytes_saved: int = 0  # raw bytes of chunks that did not have to be downloaded
    from_reflector: int = 0  # deltas whose body came from the branch reflector
    failed: list[str] = field(default_factory=list)  # why a delta was not used


def _is_file(e: Entry | None) -> bool:
    return e is not None and e.type is EntryType.FILE and 0 < e.size <= MAX_DELTA_BYTES


def _shape(path: bytes) -> bytes:
    return _DIGITS.sub(b"#", path)


class _OldVersions:
    """Where to find the endpoint's older version of a file of the update."""

    def __init__(self, current: Iterable[Entry]):
        self.by_path: dict[bytes, Entry] = {}
        self.by_shape: dict[bytes, list[Entry]] = {}
        self.by_name: dict[bytes, list[Entry]] = {}
        for e in current:
            self.by_path[e.path] = e
            if _is_file(e):
                self.by_shape.setdefault(_shape(e.path), []).append(e)
                self.by_name.setdefault(_shape(posixpath.basename(e.path)), []).append(e)

    def of(self, new: Entry, old: Entry | None) -> Entry | None:
        if _is_file(old):
            return old
        if old is not None and old.type is EntryType.SYMLINK:  # libc.so.6 -> libc-2.31.so
            target = posixpath.normpath(posixpath.join(posixpath.dirname(old.path),
                                                       old.link_target or b""))
            hit = self.by_path.get(target)
            if _is_file(hit):
                return hit
        for table, key in ((self.by_shape, _shape(new.path)),
                           (self.by_name, _shape(posixpath.basename(new.path)))):
            alike = [e for e in table.get(key, []) if e.path != new.path]
            if alike:  # the closest in size (python3.9/x.py and python3.10/x.py for 3.11)
                return min(alike, key=lambda e: abs(e.size - new.size))
        return None


def candidates(plan: Plan, current: Iterable[Entry], lacking: set[bytes]) -> list[Candidate]:
    """Files of the plan the endpoint lacks chunks of and holds an older version of, in
    the plan's (tree) order, each content once."""
    olds = _OldVersions(current)
    out = []
    seen: set[bytes] = set()
    for c in plan.changes:
        new = c.entry
        if new is None or new.type is not EntryType.FILE or c.content is not None or \
                c.action not in (Action.ADD, Action.REPLACE) or new.content_hash in seen or \
                new.size > MAX_DELTA_BYTES:
            continue
        need = sum(n for cid, n in new.chunks if cid in lacking)
        old = olds.of(new, c.old)
        if old is None or need == 0 or old.content_hash == new.content_hash:
            continue
        seen.add(new.content_hash)
        out.append(Candidate(old, new, need))
    return out


def groups(cands: list[Candidate]) -> Iterator[list[Candidate]]:
    """Candidates cut into groups by content (strata.engine.delta.closes_group); only the
    groups worth a delta."""
    group: list[Candidate] = []
    size = 0

    def worth(g: list[Candidate]) -> bool:
        return worth_trying(sum(c.old.size for c in g), sum(c.new.size for c in g),
                            sum(c.lacking for c in g))

    for c in cands:
        if group and size + c.new.size > MAX_DELTA_BYTES:
            if worth(group):
                yield group
            group, size = [], 0
        group.append(c)
        size += c.new.size
        if closes_group(size, c.new.content_hash) or len(group) >= MAX_DELTA_FILES:
            if worth(group):
                yield group
            group, size = [], 0
    if group and worth(group):
        yield group


def _requests(gs: Iterable[list[Candidate]], max_groups: int = MAX_DELTA_FILES
              ) -> Iterator[list[list[Candidate]]]:
    batch: list[list[Candidate]] = []
    size = files = 0
    for g in gs:
        n = sum(c.new.size for c in g)
        if batch and (size + n > BATCH_BYTES or files + len(g) > MAX_DELTA_FILES
                      or len(batch) >= max_groups):
            yield batch
            batch, size, files = [], 0, 0
        batch.append(g)
        size += n
        files += len(g)
    if batch:
        yield batch


def _read_local(root: bytes, e: Entry) -> bytes:
    """The endpoint's copy of `e`, which must still be the content its entry names."""
    try:
        fd = open_path(os.path.join(root, e.path), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            data = f.read(e.size + 1)
    except OSError as exc:
        raise CorruptData(f"{_show(e)}: cannot read the local copy ({exc.strerror})") from None
    if len(data) != e.size or content_id(data) != e.content_hash:
        raise CorruptData(f"{_show(e)}: the local copy changed since the tree was read")
    return data


def _show(e: Entry) -> str:
    return e.path.decode(errors="replace")


def rebuild(root: bytes, group: list[Candidate], delta: GroupDelta, cache: Store,
            lacking: set[bytes]) -> int:
    """Rebuild a group's files from the local old copies and the delta, verify each whole
    and chunk by chunk, and put the chunks the cache lacks into it. Returns their bytes."""
    old = b"".join(_read_local(root, c.old) for c in group)
    new = memoryview(decode(old, delta.delta, sum(c.new.size for c in group)))
    ids: list[bytes] = []
    datas: list[bytes | memoryview] = []
    taken: set[bytes] = set()
    offset = 0
    for c in group:
        data = new[offset:offset + c.new.size]
        offset += c.new.size
        if content_id(data) != c.new.content_hash:
            raise CorruptData(f"{_show(c.new)}: the rebuilt file does not match its content "
                              "hash")
        pos = 0
        for cid, n in c.new.chunks:
            piece = data[pos:pos + n]
            pos += n
            if cid in lacking and cid not in taken:
                if content_id(piece) != cid:
                    raise CorruptData(f"{_show(c.new)}: a rebuilt chunk does not match its id")
                taken.add(cid)
                ids.append(cid)
                datas.append(piece)
    if ids:
        cache.store_chunks(ids, datas)
    return sum(len(d) for d in datas)


def fill_by_deltas(client: ServerClient | None, root: bytes, cache: Store, plan: Plan,
                   current: Iterable[Entry], lacking: list[bytes],
                   reflectors: ReflectorFetcher | None = None) -> DeltaStats:
    """Put into `cache` the chunks of every file a delta rebuilds; the caller then
    downloads what is still lacking as chunks. With a branch reflector, the server names
    the deltas by id (and checks the endpoint holds the old files) and the bodies come
    from the reflector; what it does not deliver comes from the server."""
    stats = DeltaStats()
    missing = set(lacking)
    if client is None or not missing:
        return stats
    try:
        for batch in _requests(groups(candidates(plan, current, missing)),
                               MAX_OFFERED if reflectors is not None else MAX_DELTA_FILES):
            stats.asked += sum(len(g) for g in batch)
            wanted = {(group_key([c.old.content_hash for c in g]),
                       group_key([c.new.content_hash for c in g])): g for g in batch}
            got: list[GroupDelta] = []
            rest = batch
            if reflectors is not None and reflectors.usable():
                got, rest = _through_reflector(client, reflectors, batch, wanted, stats)
            if rest:
                got.extend(read_deltas(client.request(
                    "POST", "/api/v1/agent/layers/deltas", json=_ask(rest)).content))
            for delta in got:
                group = wanted.pop((delta.old_key, delta.new_key), None)
                if group is None:
                    continue  # not asked for: ignored
                try:
                    stats.bytes_saved += rebuild(root, group, delta, cache, missing)
                except CorruptData as exc:
                    stats.failed.append(str(exc))
                    continue
                missing.difference_update(cid for c in group for cid, _ in c.new.chunks)
                stats.rebuilt += len(group)
    except StrataError as exc:  # an older server, a refusal, a garbled batch: chunks
        stats.failed.append(f"deltas: {exc}")
    cache.flush()
    return stats


def _ask(batch: list[list[Candidate]]) -> dict:
    return {"groups": [{"files": [{"old": c.old.content_hash.hex(),
                                   "new": c.new.content_hash.hex()} for c in g],
                        "lacking": sum(c.lacking for c in g)} for g in batch]}


def _through_reflector(client: ServerClient, reflectors: ReflectorFetcher,
                       batch: list[list[Candidate]],
                       wanted: dict[tuple[bytes, bytes], list[Candidate]], stats: DeltaStats
                       ) -> tuple[list[GroupDelta], list[list[Candidate]]]:
    """The deltas of `batch` whose bodies the reflector delivered (each checked against
    the id the server named), and the groups still to ask the server for: those whose
    body it did not deliver, or all of them when the server offers no ticket."""
    try:
        offer = parse_answer(client.request(
            "POST", "/api/v1/agent/layers/delta-offer",
            json={**_ask(batch), "reflectors": reflectors.usable()}), DeltaOffer)
    except StrataError as exc:  # an older server: the bodies from the server, as before
        stats.failed.append(f"delta offer: {exc}")
        return [], batch
    if not offer.ticket:
        return [], batch
    got, rest = [], []
    for o in offer.deltas:
        key = (bytes.fromhex(o.old_key), bytes.fromhex(o.new_key))
        if key not in wanted:
            continue  # not asked for: ignored
        body = reflectors.fetch_delta(bytes.fromhex(o.id), o.size, offer.ticket)
        if body is None:
            rest.append(wanted[key])
            continue
        stats.from_reflector += 1
        got.append(GroupDelta(key[0], key[1], o.new_size, body))
    return got, rest  # groups the offer leaves out: no delta pays, they go by chunks


def _pointer(layers_dir: Path, layer: DesiredLayer) -> Path:
    """Where the snapshot id of the last manifest kept of this layer (kind and name, any
    version) is noted: the base a later version's manifest is patched from."""
    return layers_dir / f"latest-{content_id(f'{layer.kind}/{layer.name}'.encode()).hex()[:32]}"


def note_manifest(layers_dir: Path, layer: DesiredLayer) -> None:
    atomic_write(_pointer(layers_dir, layer), layer.snapshot.encode(), durable=False)


def manifest_by_delta(client: ServerClient, layers_dir: Path, layer: DesiredLayer,
                      reflectors: ReflectorFetcher | None = None) -> bytes | None:
    """The layer's manifest rebuilt from the one kept of its previous version plus a delta,
    or None (no previous version kept, no delta paid, anything amiss): fetch it whole.
    With a branch reflector, the server names the delta by id and the reflector sends it
    (the server does, if the reflector does not). The caller verifies the manifest against
    its signature like a manifest fetched whole."""
    try:
        base = _pointer(layers_dir, layer).read_text().strip()
        if not _SNAPSHOT_ID.fullmatch(base) or base == layer.snapshot:
            return None
        old = (layers_dir / f"{base}.manifest").read_bytes()
    except OSError:
        return None
    try:
        deltas: list[GroupDelta] | None = None
        if reflectors is not None and reflectors.usable():
            deltas = _manifest_through_reflector(client, reflectors, layer, base)
        if deltas is None:
            resp = client.request("GET", f"/api/v1/agent/layers/{layer.snapshot}/"
                                         f"manifest-delta?base={base}")
            deltas = list(read_deltas(resp.content))
        for d in deltas:
            if d.old_key != content_id(old):
                return None
            new = decode(old, d.delta, d.new_size)
            return new if content_id(new) == d.new_key else None
    except StrataError:
        return None
    return None


def _manifest_through_reflector(client: ServerClient, reflectors: ReflectorFetcher,
                                layer: DesiredLayer, base: str) -> list[GroupDelta] | None:
    """The manifest's delta (checked against its id) from the reflector, [] when none
    pays, None to ask the server for it."""
    try:
        offer = parse_answer(client.request(
            "POST", f"/api/v1/agent/layers/{layer.snapshot}/manifest-delta-offer",
            json={"base": base, "reflectors": reflectors.usable()}), DeltaOffer)
    except StrataError:  # an older server
        return None
    if not offer.deltas:
        return []
    if not offer.ticket:
        return None
    o = offer.deltas[0]
    body = reflectors.fetch_delta(bytes.fromhex(o.id), o.size, offer.ticket)
    if body is None:
        return None
    return [GroupDelta(bytes.fromhex(o.old_key), bytes.fromhex(o.new_key), o.new_size, body)]

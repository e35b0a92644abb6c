"""Changed files of a layer update rebuilt from the endpoint's own older copy plus a delta
from the server (strata.engine.delta), instead of downloading their chunks.

A file is tried when the endpoint holds an older version of it: at the same path (the
plan's replaced entry), or, for a file the update adds, its predecessor: a file of the
current tree whose path differs only in its numbers (libssl.so.1.1 -> libssl.so.3,
python3.9/ -> python3.11/). Whatever goes wrong (the server sends no delta because it
does not pay, the local copy is not the content the delta was made against, the delta
does not rebuild the file's content hash) only means the file's chunks are downloaded as
before. A rebuilt file counts as downloaded once its chunks are in the cache, each
verified against its id.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from strata.agent.client import ServerClient
from strata.engine.delta import MAX_DELTA_BYTES, FileDelta, decode, read_deltas, worth_trying
from strata.errors import CorruptData, StrataError
from strata.layers.changes import Action
from strata.layers.plan import Plan
from strata.model.entry import Entry, EntryType
from strata.model.ids import content_id
from strata.model.wire import MAX_DELTA_FILES, DesiredLayer
from strata.store.backend import atomic_write
from strata.store.repository import Store
from strata.tree.scan import open_path

# New bytes per request: some 16 s of the server's CPU when none is cached (level 19), well
# inside the client's timeout; a larger file goes alone (the server takes up to 64 MiB).
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
    failed: list[str] = field(default_factory=list)  # why a delta was not used


def _is_file(e: Entry | None) -> bool:
    return e is not None and e.type is EntryType.FILE and 0 < e.size <= MAX_DELTA_BYTES


def _shape(path: bytes) -> bytes:
    return _DIGITS.sub(b"#", path)


def candidates(plan: Plan, current: Iterable[Entry], lacking: set[bytes]) -> list[Candidate]:
    """Files of the plan worth a delta, in the plan's (tree) order."""
    by_shape: dict[bytes, list[Entry]] = {}
    for e in current:
        if _is_file(e):
            by_shape.setdefault(_shape(e.path), []).append(e)
    out = []
    seen: set[bytes] = set()
    for c in plan.changes:
        new = c.entry
        if new is None or new.type is not EntryType.FILE or c.content is not None or \
                c.action not in (Action.ADD, Action.REPLACE) or new.content_hash in seen:
            continue
        old = c.old if _is_file(c.old) else _predecessor(new, by_shape)
        if old is None:
            continue
        need = sum(n for cid, n in new.chunks if cid in lacking)
        if worth_trying(old.size, new.size, need) and old.content_hash != new.content_hash:
            seen.add(new.content_hash)
            out.append(Candidate(old, new, need))
    return out


def _predecessor(new: Entry, by_shape: dict[bytes, list[Entry]]) -> Entry | None:
    """The current file whose path differs from `new`'s only in its numbers, the closest
    in size if several (python3.9/x.py and python3.10/x.py for python3.11/x.py)."""
    alike = [e for e in by_shape.get(_shape(new.path), []) if e.path != new.path]
    return min(alike, key=lambda e: abs(e.size - new.size), default=None)


def _batches(cands: list[Candidate]) -> Iterable[list[Candidate]]:
    batch: list[Candidate] = []
    size = 0
    for c in cands:
        if batch and (size + c.new.size > BATCH_BYTES or len(batch) >= MAX_DELTA_FILES):
            yield batch
            batch, size = [], 0
        batch.append(c)
        size += c.new.size
    if batch:
        yield batch


def _read_local(root: bytes, e: Entry) -> bytes:
    """The endpoint's copy of `e`, which must still be the content its entry names."""
    try:
        fd = open_path(os.path.join(root, e.path), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            data = f.read(e.size + 1)
    except OSError as exc:
        raise CorruptData(f"cannot read the local copy ({exc.strerror})") from None
    if len(data) != e.size or content_id(data) != e.content_hash:
        raise CorruptData("the local copy changed since the tree was read")
    return data


def rebuild(root: bytes, cand: Candidate, delta: FileDelta, cache: Store,
            lacking: set[bytes]) -> int:
    """Rebuild the new file from the local old copy and the delta, verify it whole and
    chunk by chunk, and put the chunks the cache lacks into it. Returns their bytes."""
    old = _read_local(root, cand.old)
    new = decode(old, delta.delta, cand.new.size)
    if content_id(new) != cand.new.content_hash:
        raise CorruptData("the rebuilt file does not match its content hash")
    ids, datas, offset = [], [], 0
    view = memoryview(new)
    for cid, n in cand.new.chunks:
        piece = view[offset:offset + n]
        offset += n
        if cid in lacking and cid not in ids:
            if content_id(piece) != cid:
                raise CorruptData("a rebuilt chunk does not match its id")
            ids.append(cid)
            datas.append(piece)
    if ids:
        cache.store_chunks(ids, datas)  # type: ignore[arg-type]
    return sum(len(d) for d in datas)


def fill_by_deltas(client: ServerClient | None, root: bytes, cache: Store, plan: Plan,
                   current: Iterable[Entry], lacking: list[bytes]) -> DeltaStats:
    """Put into `cache` the chunks of every file a delta rebuilds; the caller then
    downloads what is still lacking as chunks."""
    stats = DeltaStats()
    missing = set(lacking)
    cands = candidates(plan, current, missing) if client is not None else []
    try:
        for batch in _batches(cands):
            stats.asked += len(batch)
            resp = client.request(  # type: ignore[union-attr]
                "POST", "/api/v1/agent/layers/deltas",
                json={"files": [{"old": c.old.content_hash.hex(),
                                 "new": c.new.content_hash.hex(), "lacking": c.lacking}
                                for c in batch]})
            wanted = {(c.old.content_hash, c.new.content_hash): c for c in batch}
            for delta in read_deltas(resp.content):
                cand = wanted.pop((delta.old_hash, delta.new_hash), None)
                if cand is None:
                    continue  # not asked for: ignored
                try:
                    stats.bytes_saved += rebuild(root, cand, delta, cache, missing)
                except CorruptData as exc:
                    stats.failed.append(f"{cand.new.path.decode(errors='replace')}: {exc}")
                    continue
                missing.difference_update(cid for cid, _ in cand.new.chunks)
                stats.rebuilt += 1
    except StrataError as exc:  # an older server, a refusal, a garbled batch: chunks
        stats.failed.append(f"deltas: {exc}")
    cache.flush()
    return stats


def _pointer(layers_dir: Path, layer: DesiredLayer) -> Path:
    """Where the snapshot id of the last manifest kept of this layer (kind and name, any
    version) is noted: the base a later version's manifest is patched from."""
    return layers_dir / f"latest-{content_id(f'{layer.kind}/{layer.name}'.encode()).hex()[:32]}"


def note_manifest(layers_dir: Path, layer: DesiredLayer) -> None:
    atomic_write(_pointer(layers_dir, layer), layer.snapshot.encode(), durable=False)


def manifest_by_delta(client: ServerClient, layers_dir: Path, layer: DesiredLayer
                      ) -> bytes | None:
    """The layer's manifest rebuilt from the one kept of its previous version plus a delta,
    or None (no previous version kept, no delta paid, anything amiss): fetch it whole.
    The caller verifies it against its signature like a manifest fetched whole."""
    try:
        base = _pointer(layers_dir, layer).read_text().strip()
        if not _SNAPSHOT_ID.fullmatch(base) or base == layer.snapshot:
            return None
        old = (layers_dir / f"{base}.manifest").read_bytes()
    except OSError:
        return None
    try:
        resp = client.request("GET", f"/api/v1/agent/layers/{layer.snapshot}/manifest-delta"
                                     f"?base={base}")
        for d in read_deltas(resp.content):
            if d.old_hash != content_id(old):
                return None
            new = decode(old, d.delta, d.new_size)
            return new if content_id(new) == d.new_hash else None
    except StrataError:
        return None
    return None

"""Backup: turn a directory tree into a snapshot, reading only what changed.

Files whose size, mtime, ctime and inode match the parent snapshot reuse its chunk
list without being opened. Everything else is read, cut with FastCDC, hashed with
BLAKE3 and stored once store-wide. Worker threads do the reading, hashing and
compression (all release the GIL); entries are written to the manifest in tree order.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import blake3

from strata.errors import MissingChunks, StrataError
from strata.model.entry import Entry, EntryType
from strata.model.ids import content_id
from strata.model.manifest import decode_manifest, encode_manifest
from strata.model.snapshot import Snapshot, now_iso
from strata.store.repository import Store
from strata.tree.excludes import ExcludeMatcher
from strata.tree.order import path_key
from strata.tree.scan import scan_tree

from .progress import Progress

READ_BLOCK = 8 << 20  # files above this are streamed through the chunker, not slurped
_WINDOW = 256  # files in flight; bounds memory while keeping the workers busy


@dataclass
class BackupResult:
    snapshot: str
    files: int = 0
    dirs: int = 0
    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0
    bytes_read: int = 0  # bytes read from the source tree
    bytes_total: int = 0  # logical size of all files in the snapshot
    bytes_new: int = 0  # raw bytes of chunks the store did not hold before
    bytes_stored: int = 0  # bytes those chunks took in the store (compressed, sealed)
    chunks_new: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _ParentCursor:
    """Walks the parent manifest alongside the scan (both in tree order)."""

    def __init__(self, entries: Iterator[Entry] | None):
        self._it = entries
        self._cur: Entry | None = next(entries, None) if entries else None

    def find(self, path: bytes) -> Entry | None:
        key = path_key(path)
        while self._cur is not None and path_key(self._cur.path) < key:
            self._cur = next(self._it, None)  # type: ignore[arg-type]
        if self._cur is not None and self._cur.path == path:
            return self._cur
        return None


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes_read = 0
        self.bytes_new = 0
        self.bytes_stored = 0
        self.chunks_new = 0

    def add(self, read: int, new: int, stored: int, chunks: int) -> None:
        with self.lock:
            self.bytes_read += read
            self.bytes_new += new
            self.bytes_stored += stored
            self.chunks_new += chunks


def find_parent(store: Store, host: str, paths: list[str]) -> Snapshot | None:
    """The latest snapshot of the same host and paths: its stats feed the files cache."""
    for snap in reversed(store.snapshots()):
        if snap.host == host and snap.paths == paths:
            return snap
    return None


def _read_chunks(store: Store, path: bytes, size: int) -> Iterator[memoryview | bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0)) \
        if os.geteuid() == 0 else os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb", buffering=0) as f:
        if size <= READ_BLOCK:
            buf = f.read()
            yield from store.chunker.cut(buf)
            return
        # Stream: keep the tail after the last cut and prepend it to the next block, so
        # cut points are the same as if the file were chunked in one piece.
        tail = b""
        while True:
            block = f.read(READ_BLOCK)
            buf = tail + block if tail else block
            if not block:
                if buf:
                    yield from store.chunker.cut(buf)
                return
            pieces = list(store.chunker.cut(buf))
            if len(buf) < store.chunker.params.max_size * 2:
                tail = buf
                continue
            yield from pieces[:-1]
            tail = bytes(pieces[-1])


def _archive_file(store: Store, counters: _Counters, progress: Progress | None, abspath: bytes,
                  entry: Entry) -> Entry:
    hasher = blake3.blake3()
    chunks: list[tuple[bytes, int]] = []
    read = new = stored = nchunks = 0
    for data in _read_chunks(store, abspath, entry.size):
        cid = content_id(data)
        hasher.update(data)
        added = store.store_chunk(cid, data)
        if added:
            new += len(data)
            stored += added
            nchunks += 1
        read += len(data)
        chunks.append((cid, len(data)))
        if progress:
            progress.advance(nbytes=len(data))
    entry.chunks = chunks
    entry.content_hash = hasher.digest()
    entry.size = read  # the file may have changed size since it was stat'ed
    counters.add(read, new, stored, nchunks)
    if progress:
        progress.advance(files=1)
    return entry


def backup(store: Store, source: str | os.PathLike, *, tags: list[str] | None = None,
           excludes: list[str] | None = None, host: str | None = None, trigger: str = "user",
           parent: Snapshot | None | bool = True, progress: Progress | None = None,
           workers: int | None = None) -> BackupResult:
    """Back up `source` into `store`; returns what was done (and the new snapshot id)."""
    started = time.monotonic()
    src = Path(source).resolve()
    if not src.is_dir():
        raise StrataError(f"source {source} is not a directory")
    host = host or socket.gethostname()
    paths = [str(src)]
    if parent is True:
        parent = find_parent(store, host, paths)
    elif parent is False:
        parent = None
    result = BackupResult(snapshot="")
    counters = _Counters()
    matcher = ExcludeMatcher(excludes or [])
    referenced: set[bytes] = set()
    with store.session("backup") as session:
        store.reconcile_index()
        cursor = _ParentCursor(store.iter_manifest(parent) if parent else None)
        with tempfile.TemporaryFile(prefix="strata-manifest-") as mf, \
                ThreadPoolExecutor(max_workers=workers or (os.cpu_count() or 2) + 1) as pool:
            inflight: deque[tuple[Entry, Future[Entry] | None]] = deque()

            def emit(entry: Entry) -> None:
                for piece in encode_manifest_entries([entry]):
                    mf.write(piece)
                referenced.update(cid for cid, _ in entry.chunks)
                if entry.type is EntryType.FILE:
                    result.files += 1
                    result.bytes_total += entry.size
                elif entry.type is EntryType.DIR:
                    result.dirs += 1

            def drain(limit: int) -> None:
                while len(inflight) > limit or (inflight and (inflight[0][1] is None
                                                              or inflight[0][1].done())):
                    entry, fut = inflight.popleft()
                    emit(fut.result() if fut is not None else entry)

            mf.write(next(encode_manifest([])))  # header
            for entry, abspath in scan_tree(src, matcher, errors=result.errors):
                fut = None
                if entry.type is EntryType.FILE:
                    prev = cursor.find(entry.path)
                    if prev is not None and prev.type is EntryType.FILE and prev.same_stat(entry):
                        entry.chunks, entry.content_hash = prev.chunks, prev.content_hash
                        result.files_unmodified += 1
                        if progress:
                            progress.advance(files=1, nbytes=entry.size)
                    else:
                        if prev is None:
                            result.files_new += 1
                        else:
                            result.files_changed += 1
                        fut = pool.submit(_archive_file, store, counters, progress, abspath,
                                          entry)
                inflight.append((entry, fut))
                drain(_WINDOW)
            drain(0)
            store.flush()
            session.refresh()
            mf.seek(0)
            manifest_bytes = mf.read()
        manifest, mstats = _store_manifest(store, manifest_bytes)
        counters.add(0, *mstats)
        referenced.update(cid for cid, _ in manifest)
        snap = Snapshot(time=now_iso(), host=host, paths=paths, tags=list(tags or []),
                        parent=parent.id if parent else None, trigger=trigger,
                        manifest=[(c.hex(), n) for c, n in manifest],
                        manifest_id=content_id(manifest_bytes).hex())
        result.bytes_read = counters.bytes_read
        result.bytes_new = counters.bytes_new
        result.bytes_stored = counters.bytes_stored
        result.chunks_new = counters.chunks_new
        snap.stats = {k: v for k, v in result.to_dict().items()
                      if k not in ("snapshot", "errors", "seconds")}
        _commit_with_heal(store, snap, referenced, src, manifest_bytes)
    result.snapshot = snap.id
    result.seconds = round(time.monotonic() - started, 3)
    return result


def encode_manifest_entries(entries: list[Entry]) -> Iterator[bytes]:
    it = encode_manifest(entries)
    next(it)  # skip the header: it is written once per manifest
    return it


def _store_manifest(store: Store, data: bytes) -> tuple[list[tuple[bytes, int]], tuple]:
    out, new, stored, n = [], 0, 0, 0
    for piece in store.chunker.cut(data):
        cid = content_id(piece)
        added = store.store_chunk(cid, piece)
        if added:
            new, stored, n = new + len(piece), stored + added, n + 1
        out.append((cid, len(piece)))
    store.flush()
    return out, (new, stored, n)


def _commit_with_heal(store: Store, snap: Snapshot, referenced: set[bytes], src: Path,
                      manifest_bytes: bytes) -> None:
    """Commit; if a concurrent prune removed chunks we deduplicated against, store them
    again from the source (their bytes are still there) and retry."""
    for _ in range(3):
        try:
            store.commit_snapshot(snap, referenced)
            return
        except MissingChunks as exc:
            _reupload(store, set(exc.missing), src, manifest_bytes)
    raise StrataError("chunks keep disappearing during commit: is a prune running? retry")


def _reupload(store: Store, missing: set[bytes], src: Path, manifest_bytes: bytes) -> None:
    for piece in store.chunker.cut(manifest_bytes):
        cid = content_id(piece)
        if cid in missing:
            store.store_chunk(cid, piece)
            missing.discard(cid)
    for entry in decode_manifest([manifest_bytes]):
        wanted = [(i, c) for i, (c, _) in enumerate(entry.chunks) if c in missing]
        if not wanted:
            continue
        offsets = [0]
        for _, n in entry.chunks:
            offsets.append(offsets[-1] + n)
        with open(os.path.join(os.fsencode(src), entry.path), "rb") as f:
            for i, cid in wanted:
                f.seek(offsets[i])
                data = f.read(entry.chunks[i][1])
                if content_id(data) != cid:
                    raise StrataError(f"{os.fsdecode(entry.path)} changed during backup; "
                                      "run the backup again")
                store.store_chunk(cid, data)
                missing.discard(cid)
    store.flush()

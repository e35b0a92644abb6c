"""Restore: materialize a snapshot (or part of it) under a target directory.

Chunks are fetched and verified by worker threads ahead of the writer, in manifest
order, with a bounded lookahead; the writer (strata.tree.writer) refuses any path that
would land outside the target. A bad entry (a damaged chunk, a path that would leave the
target, a write the filesystem refuses) costs only itself: it is reported and skipped.
Unless `full_metadata`, the restore is safe for a tree that is not the machine's own
system: no device nodes, setuid/setgid bits or privileged xattrs (file capabilities).
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Protocol

from strata.errors import CorruptData, PathNotInSnapshot, StrataError, UnsafePath
from strata.model.entry import Entry, EntryType
from strata.model.snapshot import Snapshot
from strata.tree.scan import display
from strata.tree.writer import TreeWriter, validate_path

from .progress import Progress

_LOOKAHEAD = 128  # chunks decoded ahead of the writer (about 8 MiB)
# The target as a whole refuses writes: skipping entry after entry would only repeat it.
_TARGET_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


@dataclass
class RestoreResult:
    snapshot: str
    files: int = 0
    dirs: int = 0
    other: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # one per entry skipped
    warnings: list[str] = field(default_factory=list)
    withheld: list[str] = field(default_factory=list)  # left out by a safe restore

    def to_dict(self) -> dict:
        return asdict(self)


def normalize_include(path: str) -> bytes:
    p = os.fsencode(path).strip(b"/")
    if not p:
        raise UnsafePath(f"{path!r} names no path: give one relative to the snapshot's "
                         "root, e.g. home/alice (or leave it out for everything)")
    validate_path(p)
    return p


def _selector(includes: list[bytes]) -> Callable[[bytes], bool]:
    if not includes:
        return lambda p: True
    ancestors = {b"/".join(inc.split(b"/")[:i]) for inc in includes
                 for i in range(1, inc.count(b"/") + 1)}

    def wanted(p: bytes) -> bool:
        if p in ancestors:
            return True
        return any(p == inc or p.startswith(inc + b"/") for inc in includes)
    return wanted


class ChunkSource(Protocol):
    """Where restore reads from: the local Store, or the server (the agent's restore)."""

    def iter_manifest(self, snap: Snapshot) -> Iterator[Entry]: ...
    def load_chunks(self, ids: list[bytes]) -> list[bytes | CorruptData]: ...


def prefetch(pool: ThreadPoolExecutor, ids: Iterable[bytes],
             load_many: Callable[[list[bytes]], list[bytes | CorruptData]],
             batch: int, ahead: int) -> Iterator[bytes | BaseException]:
    """Yield each id's chunk, or its error, in order: `batch` ids per task (one future and
    one index query each, not one per chunk), at most `ahead` tasks running. A damaged
    chunk fails only its own item."""
    queue: deque[Future[list[bytes | BaseException]]] = deque()

    def run(part: list[bytes]) -> list[bytes | BaseException]:
        try:
            return list(load_many(part))
        except BaseException as exc:  # e.g. the server went away: every chunk fails
            return [exc] * len(part)

    part: list[bytes] = []
    for cid in ids:
        part.append(cid)
        if len(part) == batch:
            queue.append(pool.submit(run, part))
            part = []
            while len(queue) >= ahead:
                yield from queue.popleft().result()
    if part:
        queue.append(pool.submit(run, part))
    while queue:
        yield from queue.popleft().result()


def select_entries(store: ChunkSource, snap: Snapshot,
                   includes: list[str] | None) -> Iterator[Entry]:
    """Entries to restore; a hardlink whose first name is not included becomes that file.

    Raises at once (before anything is written) if an include names nothing in the
    snapshot: a user asking for a file that is not there must not be told it worked."""
    incs = [normalize_include(i) for i in includes or []]
    if not incs:
        return store.iter_manifest(snap)
    wanted = _selector(incs)
    # First pass: which includes exist, and which excluded files are the first name of
    # an included hardlink.
    found: set[bytes] = set()
    needed: set[bytes] = set()
    for e in store.iter_manifest(snap):
        for inc in incs:
            if e.path == inc or e.path.startswith(inc + b"/"):
                found.add(inc)
        if e.type is EntryType.HARDLINK and wanted(e.path) and not wanted(e.link_target):
            needed.add(e.link_target)
    absent = [os.fsdecode(i) for i in incs if i not in found]
    if absent:
        raise PathNotInSnapshot(f"not in snapshot {snap.id[:8]}: {', '.join(absent)}")
    return _select(store, snap, wanted, needed)


def _select(store: ChunkSource, snap: Snapshot, wanted: Callable[[bytes], bool],
            needed: set[bytes]) -> Iterator[Entry]:
    stash: dict[bytes, Entry] = {}  # excluded first names that included links need
    moved: dict[bytes, bytes] = {}  # excluded first name -> where its data was restored
    for e in store.iter_manifest(snap):
        if e.path in needed:
            stash[e.path] = e
        if not wanted(e.path):
            continue
        if e.type is EntryType.HARDLINK and not wanted(e.link_target):
            if e.link_target in moved:
                e.link_target = moved[e.link_target]
            elif e.link_target in stash:
                first = stash.pop(e.link_target)
                moved[first.path] = e.path
                e = dataclasses.replace(first, path=e.path)
        yield e


def restore(store: ChunkSource, snap: Snapshot, target: str | os.PathLike, *,
            includes: list[str] | None = None, progress: Progress | None = None,
            workers: int | None = None, batch: int = 32,
            full_metadata: bool = False) -> RestoreResult:
    """Restore `snap` (or the `includes` paths of it) under `target`. `full_metadata`
    (for the machine's own tree): device nodes, setuid/setgid bits and every xattr too.
    Raises StrataError if the target itself refuses writes (full, read-only)."""
    started = time.monotonic()
    if os.path.lexists(target) and not os.path.isdir(target):
        raise StrataError(f"restore target {os.fsdecode(target)} exists and is not a "
                          "directory: give a directory (new or existing)")
    result = RestoreResult(snapshot=snap.id)
    entries_a, entries_b = itertools.tee(select_entries(store, snap, includes))
    chunk_ids = (cid for e in entries_b if e.type is EntryType.FILE for cid, _ in e.chunks)
    with ThreadPoolExecutor(max_workers=workers or (os.cpu_count() or 2) + 1) as pool, \
            TreeWriter(target, full_metadata=full_metadata) as writer:
        stream = prefetch(pool, chunk_ids, store.load_chunks, batch,
                          max(2, _LOOKAHEAD // batch))
        for entry in entries_a:
            if entry.type is EntryType.FILE:
                # Pulled as the file is written: a large file never has all of its
                # chunks in memory at once, only the lookahead.
                chunks = itertools.islice(stream, len(entry.chunks))
                _restore_file(writer, entry, chunks, result, progress)
            elif _write(writer, entry, None, result):
                if entry.type is EntryType.DIR:
                    result.dirs += 1
                else:
                    result.other += 1
        writer.finish()
        result.warnings.extend(writer.warnings)
        result.withheld.extend(writer.withheld)
        for key, n in sorted(writer.withheld_xattrs.items()):
            result.withheld.append(f"{display(key)} left out of {n} "
                                   f"{'path' if n == 1 else 'paths'}")
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _write(writer: TreeWriter, entry: Entry, data: Iterator[bytes] | None,
           result: RestoreResult) -> bool:
    """Write one entry; a bad one is reported in `result.errors` and skipped."""
    try:
        writer.write(entry, data)
        return True
    except UnsafePath as exc:  # its message names the path
        result.errors.append(str(exc))
    except StrataError as exc:  # CorruptData, an unknown entry type
        result.errors.append(f"{display(entry.path)}: {exc}")
    except (ValueError, OverflowError) as exc:  # a crafted field (an mtime out of range)
        result.errors.append(f"{display(entry.path)}: not restored: {exc}")
    except OSError as exc:
        if exc.errno in _TARGET_ERRORS:
            raise StrataError(f"cannot write to {display(writer.target)}: {exc.strerror} "
                              f"(stopped at {display(entry.path)}; {result.files} files "
                              "restored)") from None
        result.errors.append(f"{display(entry.path)}: not restored: {exc.strerror or exc}")
    return False


def _restore_file(writer: TreeWriter, entry: Entry, chunks: Iterator[bytes | BaseException],
                  result: RestoreResult, progress: Progress | None) -> None:
    written = 0

    def data() -> Iterator[bytes]:
        nonlocal written
        for chunk in chunks:
            if isinstance(chunk, BaseException):
                raise chunk
            written += len(chunk)
            yield chunk
    if _write(writer, entry, data(), result):
        result.files += 1
    else:
        for _ in chunks:  # consume this file's remaining chunks: the stream stays aligned
            pass
    result.bytes_written += written
    if progress:
        progress.advance(files=1, nbytes=written)

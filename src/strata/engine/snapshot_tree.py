"""A snapshot as a read-only tree: look a path up, list a folder, stat, read a file's
bytes at any offset. Shared by the FUSE mount, the server's browse and download routes
and the console, so each of them reads snapshots the same way.

The manifest is indexed once (each entry's name, inode and where its record lies in the
manifest bytes); entries are decoded again on demand, so a tree of a million paths costs
its manifest plus a dict of names, not a million `Entry` objects. File content is read
chunk by chunk through `load_chunks` (the local store, or the server for a remote
mount), each chunk verified against its id by that source, with a bounded cache in
front: reading one file fetches only that file's chunks.
"""

from __future__ import annotations

import bisect
import itertools
import os
import stat
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

import msgpack

from strata.errors import CorruptData, PathNotInSnapshot, StrataError, UnsafePath
from strata.model.entry import Entry, EntryType
from strata.model.manifest import FORMAT, decode_entry
from strata.model.snapshot import Snapshot
from strata.store.repository import Store
from strata.tree.scan import display
from strata.tree.writer import validate_path

ROOT_INODE = 1  # FUSE's root inode; entries are numbered from 2 in manifest order
DEFAULT_CACHE_BYTES = 64 << 20
READ_AHEAD_BYTES = 4 << 20  # of a file read sequentially, fetched in one request
FETCH_BATCH = 64  # chunks asked of the source in one request
_ENTRY_CACHE = 4096  # decoded entries kept

LoadChunks = Callable[[list[bytes]], list["bytes | CorruptData"]]

_FILE_TYPE = {EntryType.FILE: stat.S_IFREG, EntryType.DIR: stat.S_IFDIR,
              EntryType.SYMLINK: stat.S_IFLNK, EntryType.FIFO: stat.S_IFIFO,
              EntryType.CHARDEV: stat.S_IFCHR, EntryType.BLOCKDEV: stat.S_IFBLK}


class NotADirectory(StrataError):
    http_status = 422


class NotAFile(StrataError):
    http_status = 422


@dataclass(frozen=True)
class Attr:
    """What stat says of one node. Hardlinks are one inode with `nlink` names."""

    inode: int
    type: EntryType  # never HARDLINK: a further name shows its file's attributes
    mode: int  # permission bits only
    uid: int
    gid: int
    size: int
    mtime_ns: int
    nlink: int
    rdev: int

    @property
    def st_mode(self) -> int:
        return _FILE_TYPE[self.type] | self.mode


@dataclass
class FetchStats:
    chunks_fetched: int = 0  # asked of the source (cache misses)
    bytes_fetched: int = 0
    cache_hits: int = 0
    requests: int = 0


class ChunkCache:
    """Chunks by id, least recently used first out, at most `capacity` bytes. Misses are
    fetched together in one call of `load`; `stats` counts what reached the source."""

    def __init__(self, load: LoadChunks, capacity: int = DEFAULT_CACHE_BYTES) -> None:
        self._load = load
        self.capacity = capacity
        self.size = 0
        self._chunks: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()
        # One fetch at a time: two readers of the same file would otherwise fetch the
        # same chunks twice.
        self._fetch_lock = threading.Lock()
        self.stats = FetchStats()

    def _cached(self, cid: bytes) -> bytes | None:
        with self._lock:
            data = self._chunks.get(cid)
            if data is not None:
                self._chunks.move_to_end(cid)
            return data

    def _keep(self, cid: bytes, data: bytes) -> None:
        with self._lock:
            if cid in self._chunks or len(data) > self.capacity:
                return
            self._chunks[cid] = data
            self.size += len(data)
            while self.size > self.capacity:
                _, old = self._chunks.popitem(last=False)
                self.size -= len(old)

    def has(self, cid: bytes) -> bool:
        with self._lock:
            return cid in self._chunks

    def _fetch(self, want: list[bytes]) -> dict[bytes, bytes | BaseException]:
        """Load `want` from the source (the caller holds the fetch lock) and keep what
        arrived whole."""
        out: dict[bytes, bytes | BaseException] = {}
        for start in range(0, len(want), FETCH_BATCH):
            part = want[start:start + FETCH_BATCH]
            got = self._load(part)
            with self._lock:
                self.stats.requests += 1
                self.stats.chunks_fetched += len(part)
                self.stats.bytes_fetched += sum(len(d) for d in got if isinstance(d, bytes))
            for cid, data in zip(part, got, strict=True):
                out[cid] = data
                if not isinstance(data, BaseException):
                    self._keep(cid, data)
        return out

    def get(self, need: list[bytes], ahead: Sequence[bytes] = ()) -> list[bytes]:
        """The chunks `need` in order; `ahead` (chunks likely read next) are fetched in the
        same request when `need` misses the cache, and kept. Raises CorruptData."""
        found = {c: d for c in need if (d := self._cached(c)) is not None}
        with self._lock:
            self.stats.cache_hits += len(found)
        if len(found) < len(set(need)):
            with self._fetch_lock:
                # Another reader (or the read-ahead) may have fetched them meanwhile.
                for c in need:
                    if c not in found and (d := self._cached(c)) is not None:
                        found[c] = d
                missing = [c for c in dict.fromkeys(need) if c not in found]
                if missing:
                    skip = set(missing)
                    extra = [c for c in dict.fromkeys(ahead)
                             if c not in found and c not in skip and not self.has(c)]
                    for cid, data in self._fetch(missing + extra).items():
                        if cid in skip:
                            if isinstance(data, BaseException):
                                raise data
                            found[cid] = data
        return [found[c] for c in need]

    def warm(self, ids: Callable[[], Sequence[bytes]]) -> None:
        """Fetch and keep those of `ids()` not in the cache (a read-ahead in the
        background); a chunk that fails is left for its own read to report. `ids` is
        asked once the fetch lock is held: a read-ahead that waited for it (a busy
        machine, the reader's own fetches) must not fetch again what the reader has
        since read and the cache let go."""
        with self._fetch_lock:
            want = [c for c in dict.fromkeys(ids()) if not self.has(c)]
            if want:
                self._fetch(want)


class _File:
    """A file's chunk list with where each chunk starts, for reads at any offset."""

    __slots__ = ("ids", "starts", "size")

    def __init__(self, entry: Entry) -> None:
        self.ids = [cid for cid, _ in entry.chunks]
        self.starts = [0, *itertools.accumulate(n for _, n in entry.chunks)]
        self.size = self.starts[-1]

    def span(self, offset: int, size: int) -> tuple[int, int]:
        """The indexes [first, last) of the chunks holding bytes [offset, offset+size)."""
        first = bisect.bisect_right(self.starts, offset) - 1
        last = bisect.bisect_left(self.starts, min(offset + size, self.size))
        return first, max(first, last)


class SnapshotTree:
    """The tree of one manifest. Entries a crafted manifest could use to mislead (an
    unsafe path, a name given twice, a child of something that is not a folder, a
    hardlink to nothing earlier) are left out and counted in `skipped`, as restore
    would skip them."""

    def __init__(self, manifest: bytes, load_chunks: LoadChunks, *, mtime_ns: int = 0,
                 cache_bytes: int = DEFAULT_CACHE_BYTES,
                 read_ahead: int = READ_AHEAD_BYTES) -> None:
        self._manifest = manifest
        self.cache = ChunkCache(load_chunks, cache_bytes)
        # Never more ahead than a quarter of the cache: what is fetched must still be
        # there when it is read.
        self._read_ahead = min(read_ahead, cache_bytes // 4)
        self._root_mtime = mtime_ns
        # inode - 2 -> where its record starts and ends in the manifest; its last path
        # component. Arrays and a list, not dicts: a few bytes per entry, not a hundred.
        self._starts = array("Q")
        self._ends = array("Q")
        self._names: list[bytes] = []
        self._by_path: dict[bytes, int] = {b"": ROOT_INODE}
        self._children: dict[int, list[int]] = {ROOT_INODE: []}
        self._link: dict[int, int] = {}  # a hardlink's inode -> its file's inode
        self._nlink: dict[int, int] = {}  # a file with further names -> its name count
        self._subdirs: dict[int, int] = {}  # dir inode -> how many dirs it holds
        self.skipped: list[str] = []
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._files: OrderedDict[int, _File] = OrderedDict()
        self._lock = threading.Lock()
        self._sequential: dict[int, int] = {}  # inode -> where its last read ended
        self._warmer: ThreadPoolExecutor | None = None  # the background read-ahead
        self._warming = False
        self._index()

    @classmethod
    def of_store(cls, store: Store, snap: Snapshot, *,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> SnapshotTree:
        """The tree of a snapshot in a local `Store`."""
        manifest = b"".join(store.load_chunk(c) for c in snap.manifest_chunk_ids())
        return cls(manifest, store.load_chunks, mtime_ns=snapshot_mtime_ns(snap.time),
                   cache_bytes=cache_bytes)

    # -- indexing --------------------------------------------------------------------------
    def _index(self) -> None:
        unpacker = msgpack.Unpacker(raw=False, use_list=True, strict_map_key=False,
                                    max_buffer_size=max(len(self._manifest), 1 << 20))
        unpacker.feed(self._manifest)
        try:
            header = unpacker.unpack()
        except (msgpack.OutOfData, ValueError, msgpack.FormatError,
                msgpack.StackError) as exc:
            raise CorruptData(f"malformed manifest ({exc.__class__.__name__})") from None
        if not isinstance(header, dict) or header.get("strata-manifest") != FORMAT:
            raise CorruptData("not a Strata manifest (bad header)")
        start = unpacker.tell()
        try:
            for rec in unpacker:
                end = unpacker.tell()
                self._add(decode_entry(rec), start, end)
                start = end
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
                ValueError) as exc:
            raise CorruptData(f"malformed manifest ({exc})") from None
        if start != len(self._manifest):
            raise CorruptData("manifest is truncated")

    def _add(self, e: Entry, start: int, end: int) -> None:
        try:
            validate_path(e.path)
        except UnsafePath as exc:
            self.skipped.append(str(exc))
            return
        if e.path in self._by_path:
            self.skipped.append(f"{display(e.path)}: listed twice")
            return
        parent_path, _, name = e.path.rpartition(b"/")
        parent = self._by_path.get(parent_path)
        if parent is None or parent not in self._children:
            self.skipped.append(f"{display(e.path)}: its folder is not in the snapshot")
            return
        target = 0
        if e.type is EntryType.HARDLINK:
            target = self._by_path.get(e.link_target, 0)
            target = self._link.get(target, target)
            if not target or self._type_of(target) is not EntryType.FILE:
                self.skipped.append(f"{display(e.path)}: hardlink to a file not before it")
                return
        ino = len(self._starts) + 2
        self._starts.append(start)
        self._ends.append(end)
        self._by_path[e.path] = ino
        self._names.append(name)
        self._children[parent].append(ino)
        if e.type is EntryType.DIR:
            self._children[ino] = []
            self._subdirs[parent] = self._subdirs.get(parent, 0) + 1
        if target:
            self._link[ino] = target
            self._nlink[target] = self._nlink.get(target, 1) + 1

    def _type_of(self, ino: int) -> EntryType:
        return self.entry(ino).type

    # -- lookups ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._starts)

    @property
    def manifest_size(self) -> int:
        return len(self._manifest)

    def resolve(self, path: bytes | str) -> int:
        """The inode of `path` ('' or '/' for the root); PathNotInSnapshot if absent."""
        p = os.fsencode(path).strip(b"/")
        if p:
            validate_path(p)
        ino = self._by_path.get(p)
        if ino is None:
            raise PathNotInSnapshot(f"not in the snapshot: {display(p)}")
        return self._link.get(ino, ino)

    def lookup(self, parent: int, name: bytes) -> int | None:
        """The inode of `name` in the folder `parent`, or None."""
        if parent == ROOT_INODE:
            path = name
        else:
            path = self.entry(parent).path + b"/" + name
        ino = self._by_path.get(path)
        return None if ino is None else self._link.get(ino, ino)

    def is_dir(self, ino: int) -> bool:
        return ino in self._children

    def entry(self, ino: int) -> Entry:
        """The manifest's entry for `ino` (a synthesized one for the root)."""
        if ino == ROOT_INODE:
            return Entry(path=b"", type=EntryType.DIR, mode=0o755, mtime_ns=self._root_mtime)
        with self._lock:
            hit = self._entries.get(ino)
            if hit is not None:
                self._entries.move_to_end(ino)
                return hit
        if not 2 <= ino < len(self._starts) + 2:
            raise PathNotInSnapshot(f"no inode {ino} in the snapshot")
        start, end = self._starts[ino - 2], self._ends[ino - 2]
        e = decode_entry(msgpack.unpackb(self._manifest[start:end], raw=False,
                                         use_list=True, strict_map_key=False))
        with self._lock:
            self._entries[ino] = e
            if len(self._entries) > _ENTRY_CACHE:
                self._entries.popitem(last=False)
        return e

    def attr(self, ino: int) -> Attr:
        e = self.entry(ino)
        if e.type is EntryType.DIR:
            nlink = 2 + self._subdirs.get(ino, 0)
            size = 0
        else:
            nlink = self._nlink.get(ino, 1)
            size = self._file(ino).size if e.type is EntryType.FILE else (
                len(e.link_target) if e.type is EntryType.SYMLINK else 0)
        return Attr(inode=ino, type=e.type, mode=e.mode & 0o7777, uid=e.uid, gid=e.gid,
                    size=size, mtime_ns=e.mtime_ns, nlink=nlink, rdev=e.rdev)

    def listdir(self, ino: int) -> list[tuple[bytes, int]]:
        """(name, inode) of each child of the folder `ino`, in name order."""
        kids = self._children.get(ino)
        if kids is None:
            raise NotADirectory(f"not a folder: {display(self.entry(ino).path)}")
        return [(self._names[k - 2], self._link.get(k, k)) for k in kids]

    def readlink(self, ino: int) -> bytes:
        e = self.entry(ino)
        if e.type is not EntryType.SYMLINK:
            raise NotAFile(f"not a symlink: {display(e.path)}")
        return e.link_target

    def walk(self, ino: int = ROOT_INODE, prefix: bytes = b"") -> Iterator[tuple[bytes, int]]:
        """(path relative to `ino`, inode) of everything beneath the folder `ino`, parents
        first. A hardlink is yielded under its own inode: `link_of` names its file."""
        # A stack, not recursion: a crafted manifest may nest folders thousands deep.
        stack = [(iter(self._children.get(ino, [])), prefix)]
        while stack:
            kids, base = stack[-1]
            k = next(kids, None)
            if k is None:
                stack.pop()
                continue
            rel = base + self._names[k - 2]
            yield rel, k
            if k in self._children:
                stack.append((iter(self._children[k]), rel + b"/"))

    def link_of(self, ino: int) -> int | None:
        """For a further name of a file (a hardlink), that file's inode."""
        return self._link.get(ino)

    # -- content ---------------------------------------------------------------------------
    def _file(self, ino: int) -> _File:
        with self._lock:
            hit = self._files.get(ino)
            if hit is not None:
                self._files.move_to_end(ino)
                return hit
        e = self.entry(ino)
        if e.type is not EntryType.FILE:
            raise NotAFile(f"not a file: {display(e.path)}")
        f = _File(e)
        with self._lock:
            self._files[ino] = f
            if len(self._files) > _ENTRY_CACHE:
                self._files.popitem(last=False)
        return f

    def read(self, ino: int, offset: int, size: int) -> bytes:
        """Up to `size` bytes of the file `ino` from `offset` (fewer at its end). A file
        read where its last read ended also fetches the next READ_AHEAD bytes of it."""
        f = self._file(ino)
        if offset >= f.size or size <= 0:
            return b""
        first, last = f.span(offset, size)
        ahead: list[bytes] = []
        with self._lock:
            sequential = self._sequential.get(ino, 0) == offset
            self._sequential[ino] = offset + size
            if len(self._sequential) > _ENTRY_CACHE:
                self._sequential.pop(next(iter(self._sequential)))
        if sequential and self._read_ahead:
            stop = bisect.bisect_left(f.starts, f.starts[last] + self._read_ahead)
            ahead = f.ids[last:min(stop, len(f.ids))]
        chunks = self.cache.get(f.ids[first:last], ahead)
        if sequential and self._read_ahead:
            self._read_ahead_of(ino, f, last)
        data = b"".join(chunks)
        skip = offset - f.starts[first]
        return data[skip:skip + size]

    def _read_ahead_of(self, ino: int, f: _File, last: int) -> None:
        """Start fetching, in the background, the file's chunks up to twice READ_AHEAD
        past `last` that are not cached yet: a sequential reader then finds them there
        instead of waiting for a request of its own each READ_AHEAD bytes."""
        stop = min(bisect.bisect_left(f.starts, f.starts[last] + 2 * self._read_ahead),
                   len(f.ids))
        gap = next((i for i in range(last, stop) if not self.cache.has(f.ids[i])), stop)
        # Topped up only once less than READ_AHEAD is left: one large request, not one
        # for every few chunks the reader moves on.
        if gap == stop or f.starts[gap] - f.starts[last] >= self._read_ahead:
            return
        with self._lock:
            if self._warming:
                return
            self._warming = True
            if self._warmer is None:
                self._warmer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readahead")
        self._warmer.submit(self._warm, f, ino, gap, stop)

    def _still_ahead(self, f: _File, ino: int, gap: int, stop: int) -> list[bytes]:
        """The chunks [gap, stop) of the file that its reader has not passed yet."""
        with self._lock:
            at = self._sequential.get(ino, 0)
        return f.ids[max(gap, bisect.bisect_right(f.starts, at) - 1):stop]

    def _warm(self, f: _File, ino: int, gap: int, stop: int) -> None:
        try:
            self.cache.warm(lambda: self._still_ahead(f, ino, gap, stop))
        except Exception:  # the read that needs the chunk reports its failure
            pass
        finally:
            with self._lock:
                self._warming = False

    def close(self) -> None:
        """Stop the background read-ahead (waits for a fetch in progress)."""
        if self._warmer is not None:
            self._warmer.shutdown(wait=True)

    def iter_content(self, ino: int, batch: int = 16) -> Iterator[bytes]:
        """The whole file, chunk by chunk (at most `batch` chunks in memory)."""
        f = self._file(ino)
        for start in range(0, len(f.ids), batch):
            part = f.ids[start:start + batch]
            yield from self.cache.get(part)

    def file_size(self, ino: int) -> int:
        return self._file(ino).size


def snapshot_mtime_ns(when: str) -> int:
    """A snapshot's time (ISO 8601) as the root folder's mtime; 0 if unreadable."""
    try:
        return int(datetime.fromisoformat(when).timestamp() * 1e9)
    except ValueError:
        return 0

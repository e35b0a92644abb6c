"""Browsing an endpoint's snapshots for IT: list a folder, download a file or a folder
(tar or zip), and read a snapshot's manifest and chunks for a remote mount or export.

Every request names an endpoint and one of *its* snapshots (a snapshot of another CVD
reads exactly like one that does not exist) and a path that must be relative and
normalized. Work is bounded: a listing answers at most MAX_LISTED entries, a chunk
request at most MAX_CHUNKS, at most MAX_DOWNLOADS downloads stream at once (429
beyond), and a download streams chunk by chunk, never holding a whole file.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

from strata.engine.snapshot_archive import Keep, tar_stream, zip_stream
from strata.engine.snapshot_tree import SnapshotTree, snapshot_mtime_ns
from strata.errors import Invalid, NotFound, PathNotInSnapshot, StrataError, TooLarge, UnsafePath
from strata.model.entry import EntryType
from strata.model.snapshot_files import (
    MAX_CHUNKS,
    MAX_LISTED,
    SnapshotFileInfo,
    SnapshotFolder,
)
from strata.server.context import ServerContext
from strata.server.services import audit, snapshots
from strata.server.services.lookup import find_endpoint
from strata.tree.writer import validate_path

MAX_DOWNLOADS = 4  # streaming at once, per server process
TREES_KEPT = 4  # indexed snapshots kept between requests ...
TREES_KEPT_BYTES = 128 << 20  # ... and their manifests' bytes (an index costs about as
                              # much again), at most
TREE_CACHE_BYTES = 8 << 20  # chunks each kept tree holds
FORMATS = ("raw", "tar", "zip")
_TYPES = {EntryType.FILE: "file", EntryType.DIR: "dir", EntryType.SYMLINK: "symlink",
          EntryType.FIFO: "fifo", EntryType.CHARDEV: "chardev",
          EntryType.BLOCKDEV: "blockdev"}


class Busy(StrataError):
    """Too many downloads at once: the caller should retry shortly."""

    http_status = 429


@dataclass
class Download:
    filename: str
    media_type: str
    body: Iterator[bytes]
    size: int | None  # known for a single file: sent as Content-Length

    @property
    def disposition(self) -> str:
        return f"attachment; filename*=UTF-8''{quote(self.filename, safe='')}"


_trees: OrderedDict[tuple[str, str], SnapshotTree] = OrderedDict()
_trees_lock = threading.Lock()
_downloads = threading.BoundedSemaphore(MAX_DOWNLOADS)


def locate(ctx: ServerContext, endpoint_ref: str, snapshot_ref: str) -> tuple[str, str]:
    """(endpoint id, snapshot id) of a snapshot of that endpoint's CVD."""
    with ctx.session() as db:
        ep = find_endpoint(db, endpoint_ref)
        rec = snapshots.find_snapshot(db, ep.id, snapshot_ref)
        return ep.id, rec.id


def snapshot_tree(ctx: ServerContext, sid: str) -> SnapshotTree:
    """The indexed tree of a stored snapshot (the last TREES_KEPT are kept: a folder
    listing, then its download, index the manifest once)."""
    key = (ctx.store.config.id, sid)
    with _trees_lock:
        tree = _trees.get(key)
        if tree is not None:
            _trees.move_to_end(key)
            return tree
    snap = ctx.store.load_snapshot(sid)
    tree = SnapshotTree(snapshots.manifest_bytes(ctx, sid), ctx.store.load_chunks,
                        mtime_ns=snapshot_mtime_ns(snap.time), cache_bytes=TREE_CACHE_BYTES)
    with _trees_lock:
        _trees[key] = tree
        while len(_trees) > TREES_KEPT or (
                len(_trees) > 1 and sum(t.manifest_size for t in _trees.values())
                > TREES_KEPT_BYTES):
            _trees.popitem(last=False)
    return tree


def parse_path(path: str | bytes) -> bytes:
    """A path as the caller gives it ('' or '/' for the root; bytes for a name that is
    not UTF-8), checked: relative to the snapshot's root, no '.', '..' or empty
    components, no NUL."""
    p = (path if isinstance(path, bytes) else os.fsencode(path)).strip(b"/")
    if p:
        try:
            validate_path(p)
        except UnsafePath as exc:
            raise Invalid(f"invalid path {_text(p)!r}: "
                          f"{str(exc).rpartition(': ')[2]}") from None
    return p


def path_from_hex(path: str, path_hex: str | None) -> str | bytes:
    """The path a request names: `path`, or the bytes `path_hex` spells (for a name
    that is not UTF-8, which a query string cannot carry), never both."""
    if path_hex is None:
        return path
    if path:
        raise Invalid("give path or path_hex, not both")
    try:
        return bytes.fromhex(path_hex)
    except ValueError:
        raise Invalid("path_hex must be hex") from None


def _text(p: bytes) -> str:
    """A path for messages and the audit log: UTF-8, other bytes as \\xNN escapes."""
    return p.decode("utf-8", "backslashreplace")


def _node(tree: SnapshotTree, p: bytes) -> int:
    try:
        return tree.resolve(p)
    except PathNotInSnapshot:
        raise NotFound(f"no {_text(p)!r} in this snapshot") from None


def _info(tree: SnapshotTree, name: bytes, ino: int) -> SnapshotFileInfo:
    a = tree.attr(ino)
    text = name.decode("utf-8", "replace")
    return SnapshotFileInfo(
        name=text, raw_name=None if text.encode() == name else name.hex(),
        type=_TYPES[a.type], size=a.size, mode=f"{a.mode:04o}", uid=a.uid, gid=a.gid,
        mtime=datetime.fromtimestamp(a.mtime_ns / 1e9, UTC), nlink=a.nlink,
        link_target=tree.readlink(ino).decode("utf-8", "replace")
        if a.type is EntryType.SYMLINK else None)


def list_folder(ctx: ServerContext, endpoint_ref: str, snapshot_ref: str,
                path: str | bytes = "",
                offset: int = 0, limit: int = 1000) -> SnapshotFolder:
    """One page of a folder's entries (or the one entry PATH names, if not a folder)."""
    if not 1 <= limit <= MAX_LISTED or offset < 0:
        raise Invalid(f"limit must be 1..{MAX_LISTED} and offset not negative")
    p = parse_path(path)
    ep, sid = locate(ctx, endpoint_ref, snapshot_ref)
    tree = snapshot_tree(ctx, sid)
    ino = _node(tree, p)
    if tree.is_dir(ino):
        kids = tree.listdir(ino)
        page = kids[offset:offset + limit]
        entries = [_info(tree, name, k) for name, k in page]
        kind, total = "dir", len(kids)
    else:
        entries = [_info(tree, p.rpartition(b"/")[2], ino)]
        kind, total = entries[0].type, 1
    return SnapshotFolder(endpoint=ep, snapshot=sid, path=p.decode("utf-8", "replace"),
                          type=kind,
                          total=total, offset=offset, entries=entries,
                          truncated=offset + len(entries) < total)


def download(ctx: ServerContext, endpoint_ref: str, snapshot_ref: str, path: str | bytes,
             fmt: str | None, actor: str, keep: Keep | None = None) -> Download:
    """A file's bytes (`raw`, the default for a file) or a tar/zip of a folder or file
    (only the members `keep` accepts, if given)
    (`tar` is the default for a folder), streamed. Refused with 429 while MAX_DOWNLOADS
    others are streaming."""
    if fmt is not None and fmt not in FORMATS:
        raise Invalid(f"format must be one of {', '.join(FORMATS)}")
    p = parse_path(path)
    ep, sid = locate(ctx, endpoint_ref, snapshot_ref)
    tree = snapshot_tree(ctx, sid)
    ino = _node(tree, p)
    is_file = tree.attr(ino).type is EntryType.FILE
    fmt = fmt or ("raw" if is_file else "tar")
    if fmt == "raw" and not is_file:
        raise Invalid(f"{_text(p) or 'the root'} is not a file: ask for a tar or zip")
    base = p.rpartition(b"/")[2].decode("utf-8", "replace") if p else f"{ep[:8]}-{sid[:8]}"
    if not _downloads.acquire(blocking=False):
        raise Busy(f"{MAX_DOWNLOADS} downloads are in progress: try again shortly")
    try:
        audit.record(ctx, actor, "snapshot-download", sid, endpoint=ep, path=_text(p),
                     format=fmt)
    except BaseException:
        _downloads.release()
        raise
    if fmt == "raw":
        return Download(base, "application/octet-stream",
                        _released(tree.iter_content(ino)), tree.file_size(ino))
    if fmt == "zip":
        return Download(base + ".zip", "application/zip",
                        _released(zip_stream(tree, p, keep)), None)
    return Download(base + ".tar", "application/x-tar",
                    _released(tar_stream(tree, p, keep)), None)


def _released(body: Iterator[bytes]) -> Iterator[bytes]:
    """`body`, giving its download slot back when it ends, fails, is closed, or is
    dropped without ever being read (a client gone before the first byte)."""
    once = threading.Lock()

    def release() -> None:
        if once.acquire(blocking=False):
            _downloads.release()

    def stream() -> Iterator[bytes]:
        try:
            yield from body
        finally:
            release()
    gen = stream()
    weakref.finalize(gen, release)
    return gen


def manifest(ctx: ServerContext, endpoint_ref: str, snapshot_ref: str,
             actor: str) -> tuple[str, str, bytes]:
    """(snapshot id, its time, manifest bytes): what a remote mount or export reads first."""
    ep, sid = locate(ctx, endpoint_ref, snapshot_ref)
    audit.record(ctx, actor, "snapshot-read", sid, endpoint=ep)
    data = snapshots.manifest_bytes(ctx, sid)
    return sid, ctx.store.load_snapshot(sid).time, data


def chunks(ctx: ServerContext, endpoint_ref: str, snapshot_ref: str,
           hex_ids: list[str]) -> bytes:
    """Chunks of that snapshot only, as a bundle (at most MAX_CHUNKS)."""
    if len(hex_ids) > MAX_CHUNKS:
        raise TooLarge(f"at most {MAX_CHUNKS} chunks per request")
    _, sid = locate(ctx, endpoint_ref, snapshot_ref)
    return snapshots.chunk_bundle(ctx, sid, hex_ids)


"""Manifests: the sorted entries of one tree, serialized compactly with msgpack.

A manifest is a header record followed by one record per entry. It is stored as
content-defined chunks in the store itself, so consecutive snapshots of a tree share
most of their manifest bytes. Decoding validates every field: a manifest may have been
crafted by someone who wants a restore to misbehave.

The files-cache keys (ctime, inode, device) describe one machine's disk, not the tree: a
manifest that leaves the machine (an agent's snapshot, a layer) carries them as zeros
(`stat_keys=False`), so that a clone's manifest, or the next snapshot's, is byte for byte
the same wherever the tree is, and its chunks deduplicate on the wire and in the store.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import BinaryIO

import msgpack

from strata.errors import CorruptData
from strata.model.entry import Entry, EntryType
from strata.model.ids import ID_LEN

FORMAT = 1
HEADER = msgpack.packb({"strata-manifest": FORMAT}, use_bin_type=True)  # how one begins
_TYPES = {t.value: t for t in EntryType}


def encode_entry(e: Entry, stat_keys: bool = True) -> list[object]:
    """The msgpack record of an entry; without `stat_keys`, ctime, inode and device are
    written as zeros."""
    rec: list[object] = [
        e.path,
        e.type.value,
        e.mode,
        e.uid,
        e.gid,
        e.mtime_ns,
        e.size,
        e.link_target,
        e.rdev,
        sorted(e.xattrs.items()),
        e.sparse,
        e.content_hash,
        b"".join(cid for cid, _ in e.chunks),
        [n for _, n in e.chunks],
        e.ctime_ns,
        e.inode,
        e.dev,
    ]
    if not stat_keys:
        rec[14:] = _NO_STAT_KEYS
    return rec


_NO_STAT_KEYS = (0, 0, 0)


_FIELDS = 17  # the length of an `encode_entry` record


def decode_entry(rec: object) -> Entry:
    if not isinstance(rec, list) or len(rec) != _FIELDS:
        raise CorruptData(f"malformed manifest entry (not a record of {_FIELDS} fields)")
    try:
        (path, typ, mode, uid, gid, mtime_ns, size, link, rdev, xattrs, sparse, chash,
         ids, lengths, ctime_ns, inode, dev) = rec
        if not isinstance(path, bytes) or not isinstance(link, bytes):
            raise TypeError("path")
        for v in (mode, uid, gid, mtime_ns, size, rdev, ctime_ns, inode, dev):
            if type(v) is not int:
                raise TypeError("int field")
        if not isinstance(ids, bytes) or len(ids) != ID_LEN * len(lengths):
            raise TypeError("chunk list")
        for n in lengths:
            if type(n) is not int or n <= 0:
                raise TypeError("chunk length")
        chunks = [(ids[i * ID_LEN:(i + 1) * ID_LEN], n) for i, n in enumerate(lengths)]
        xa = {}
        for k, v in xattrs:
            if not isinstance(k, bytes) or not isinstance(v, bytes):
                raise TypeError("xattr")
            xa[k] = v
        return Entry(path=path, type=_TYPES[typ], mode=mode, uid=uid, gid=gid,
                     mtime_ns=mtime_ns, size=size, link_target=link, rdev=rdev, xattrs=xa,
                     sparse=bool(sparse), content_hash=bytes(chash), chunks=chunks,
                     ctime_ns=ctime_ns, inode=inode, dev=dev)
    except (TypeError, ValueError, KeyError) as exc:
        raise CorruptData(f"malformed manifest entry ({exc})") from None


class ManifestWriter:
    """Streams a manifest into a binary file, one entry at a time (in tree order)."""

    def __init__(self, out: BinaryIO, stat_keys: bool = True):
        self._out = out
        self._stat_keys = stat_keys
        self._packer = msgpack.Packer(use_bin_type=True)
        out.write(self._packer.pack({"strata-manifest": FORMAT}))

    def write(self, entry: Entry) -> None:
        self._out.write(self._packer.pack(encode_entry(entry, self._stat_keys)))


def encode_manifest(entries: Iterable[Entry], stat_keys: bool = True) -> Iterator[bytes]:
    """Yield the serialized manifest piece by piece (entries must already be sorted)."""
    packer = msgpack.Packer(use_bin_type=True)
    yield packer.pack({"strata-manifest": FORMAT})
    for e in entries:
        yield packer.pack(encode_entry(e, stat_keys))


def decode_manifest(pieces: Iterable[bytes]) -> Iterator[Entry]:
    """Stream entries back out of serialized manifest bytes (given in any slicing)."""
    unpacker = msgpack.Unpacker(raw=False, use_list=True, strict_map_key=False,
                                max_buffer_size=64 << 20)
    header_seen = False
    try:
        for piece in pieces:
            unpacker.feed(piece)
            for rec in unpacker:
                if not header_seen:
                    if not isinstance(rec, dict) or rec.get("strata-manifest") != FORMAT:
                        raise CorruptData("not a Strata manifest (bad header)")
                    header_seen = True
                    continue
                yield decode_entry(rec)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            TypeError) as exc:  # TypeError: a map keyed by a map or a list (unhashable)
        raise CorruptData(f"malformed manifest ({exc})") from None
    if not header_seen:
        raise CorruptData("empty manifest")

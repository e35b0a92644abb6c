"""File deltas: changed files sent as their difference from the versions an endpoint
already holds, the way `zstd --patch-from` does it (the old content is a raw dictionary
that the new one is compressed against, the match window spanning both). Server, agent
and a future reflector share these rules and this codec; docs/layers.md explains the
numbers.

Files travel in *groups*: consecutive changed files of the tree, their old versions
concatenated as the dictionary and their new ones as the content, so that a file matches
not only its own old version but its neighbours' and the other new files (binaries of
one release share much code), as in a patch between two tarballs. Group boundaries
depend on the files' content hashes, not on their positions, so that endpoints whose
trees differ in a few files still form the same groups elsewhere, and the server's cache
of deltas serves them all.

The wire form of a batch is MAGIC then, per group that got a delta, a record
`old key (32) | new key (32) | new size (u64) | delta length (u32) | delta`, the keys
naming the group (`group_key`). A group with no record goes by chunks. The receiver
checks every rebuilt file against its content hash before using it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import zstandard

from strata.errors import CorruptData
from strata.model.ids import ID_LEN, content_id

# zstd level of a delta. The server computes each (old, new) pair once and keeps it
# (server/services/deltas.py), so it is a one-off per pair, not per endpoint. Read at each
# call (the test suite lowers it: tests/cost_factors.py).
DELTA_LEVEL = 19
# A group whose lacking chunks come to less goes by chunks (a frame and its record cost
# more than the chunk stream saves on so little).
MIN_DELTA_BYTES = 16 << 10
# Neither side of a group may be larger (memory per request on the server and the agent:
# both sides, the delta, and a match window over both).
MAX_DELTA_BYTES = 64 << 20
# Group sizes (new bytes): a group closes once past GROUP_MIN_BYTES after a file whose
# content hash says so (one in GROUP_CUT), or at GROUP_MAX_BYTES. Measured on a Debian
# migration, 8 MiB groups gave smaller deltas than 16 MiB ones, at less memory.
GROUP_MIN_BYTES = 4 << 20
GROUP_MAX_BYTES = 8 << 20
GROUP_CUT = 32
# A delta is sent only when it is at most this fraction of what the endpoint would
# otherwise download for the file (the chunks it lacks, estimated from the file compressed
# alone at ESTIMATE_LEVEL: the chunk stream itself is level 19 over many files at once,
# so the estimate runs high, and the margin keeps deltas to where they clearly win).
PAYS_RATIO = 0.75
ESTIMATE_LEVEL = 3
MAX_WINDOW_LOG = 28  # old + new <= 2 * MAX_DELTA_BYTES fit in the window
MAGIC = b"STRDLT01"
_HEAD = struct.Struct(f"<{ID_LEN}s{ID_LEN}sQI")


def group_key(hashes: list[bytes]) -> bytes:
    """The name of one side of a group: the BLAKE3 of its files' content hashes, in order."""
    return content_id(b"".join(hashes))


def closes_group(size: int, new_hash: bytes) -> bool:
    """Whether a group of `size` new bytes ends after the file `new_hash`."""
    return size >= GROUP_MAX_BYTES or (
        size >= GROUP_MIN_BYTES and int.from_bytes(new_hash[:4], "little") % GROUP_CUT == 0)


def worth_trying(old_size: int, new_size: int, lacking_bytes: int) -> bool:
    """Whether to ask for a delta of a group at all: the endpoint holds older versions,
    and the chunks it lacks are enough to matter."""
    return (lacking_bytes >= MIN_DELTA_BYTES and 0 < old_size <= MAX_DELTA_BYTES
            and new_size <= MAX_DELTA_BYTES)


def pays(delta_bytes: int, alone_bytes: int, new_size: int, lacking_bytes: int) -> bool:
    """Whether a delta of `delta_bytes` beats the chunks: `alone_bytes` is the new file
    compressed by itself, scaled to the share of it the endpoint lacks."""
    if new_size <= 0:
        return False
    chunk_cost = alone_bytes * min(lacking_bytes, new_size) / new_size
    return delta_bytes <= PAYS_RATIO * chunk_cost


def _window_log(old_size: int, new_size: int) -> int:
    return max(17, min(MAX_WINDOW_LOG, (old_size + new_size).bit_length()))


def _dictionary(old: bytes) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def encode(old: bytes, new: bytes, level: int | None = None) -> bytes:
    """`new` as a zstd frame against `old` (long-distance matching on, window over both:
    a change that moves code by megabytes still finds it), at DELTA_LEVEL by default."""
    level = DELTA_LEVEL if level is None else level
    params = zstandard.ZstdCompressionParameters.from_level(
        level, window_log=_window_log(len(old), len(new)), enable_ldm=True)
    cctx = zstandard.ZstdCompressor(dict_data=_dictionary(old), compression_params=params)
    return cctx.compress(new)


def compressed_alone(new: bytes) -> int:
    """What the new file costs compressed by itself (the yardstick of `pays`)."""
    return len(zstandard.ZstdCompressor(level=ESTIMATE_LEVEL).compress(new))


def decode(old: bytes, delta: bytes, size: int) -> bytes:
    """The file `delta` rebuilds from `old`, exactly `size` bytes, or CorruptData (never
    more output than `size`, however the delta was forged)."""
    if size > MAX_DELTA_BYTES:
        raise CorruptData("delta target is too large")
    # No larger a window than `encode` uses for these sizes: a forged frame declaring a
    # huge one would have the decoder allocate it.
    dctx = zstandard.ZstdDecompressor(dict_data=_dictionary(old),
                                      max_window_size=1 << _window_log(len(old), size))
    parts, got = [], 0
    try:
        reader = dctx.stream_reader(delta)
        while got <= size and (part := reader.read(size + 1 - got)):
            parts.append(part)
            got += len(part)
    except zstandard.ZstdError as exc:
        raise CorruptData(f"delta does not decompress: {exc}") from None
    out = b"".join(parts)
    if len(out) != size:
        raise CorruptData(f"delta gives {len(out)} bytes, not {size}")
    return out


@dataclass(frozen=True)
class GroupDelta:
    old_key: bytes  # group_key of the old versions (or a manifest's content hash)
    new_key: bytes
    new_size: int
    delta: bytes


def pack_deltas(deltas: list[GroupDelta]) -> bytes:
    parts = [MAGIC]
    for d in deltas:
        parts += [_HEAD.pack(d.old_key, d.new_key, d.new_size, len(d.delta)), d.delta]
    return b"".join(parts)


def read_deltas(data: bytes) -> Iterator[GroupDelta]:
    """The records of a `pack_deltas` body; CorruptData on any framing error."""
    if not data.startswith(MAGIC):
        raise CorruptData("not a delta batch (bad magic)")
    view = memoryview(data)
    pos = len(MAGIC)
    while pos < len(data):
        if pos + _HEAD.size > len(data):
            raise CorruptData("delta batch is truncated")
        old_key, new_key, size, n = _HEAD.unpack_from(view, pos)
        pos += _HEAD.size
        if n > len(data) - pos:
            raise CorruptData("delta batch is truncated")
        if size > MAX_DELTA_BYTES:
            raise CorruptData("delta target is too large")
        yield GroupDelta(old_key, new_key, size, bytes(view[pos:pos + n]))
        pos += n

"""The one check of a manifest a client sends (a snapshot commit, a layer capture): the
chunk ids are well-formed, its chunks are held, its size (summed from the index) is
bounded before any of it is read, its bytes hash to the manifest id (piece by piece, a
repeated piece read once), and every entry decodes and passes the rules restore enforces.
What the manifest references is returned, for the store's commit to check again under
its lock."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import blake3

from strata.errors import CorruptData, Invalid, MissingChunks, TooLarge, UnsafePath
from strata.model.entry import Entry, EntryType
from strata.model.ids import ID_LEN
from strata.model.manifest import decode_manifest
from strata.model.wire import MAX_IDS_PER_QUERY
from strata.store.repository import Store
from strata.tree.order import path_key
from strata.tree.scan import display
from strata.tree.writer import validate_path

# A manifest of some 3 million files: bounds the work one commit can ask for (a commit
# naming one large chunk many times is refused before any of it is read).
MAX_MANIFEST_BYTES = 512 << 20
_MODE_BITS = 0o7777
_ID_MAX = (1 << 32) - 1  # uid, gid


def parse_chunk_ids(hex_ids: list[str]) -> list[bytes]:
    """Chunk ids as a client sends them (hex), checked before any of them is used."""
    try:
        out = [bytes.fromhex(h) for h in hex_ids]
    except ValueError:
        raise Invalid("chunk ids must be hex") from None
    if any(len(i) != ID_LEN for i in out):
        raise Invalid(f"chunk ids must be {ID_LEN} bytes")
    return out


def check_entry(entry: Entry) -> None:
    """Raise CorruptData for an entry restore would refuse: a path that is absolute, has
    '..', '.' or empty components or a NUL byte; a negative or out-of-range field; a file
    whose chunks do not add up to its size; chunks on what is not a file. (The manifest
    decoder has checked every field's type and that chunk lengths are positive.) Written
    for speed: a commit checks every entry of a tree."""
    path = entry.path
    if b"\0" in path or not _BAD_COMPONENTS.isdisjoint(path.split(b"/")):
        _unsafe(path)
    if entry.type is EntryType.HARDLINK:
        _unsafe(entry.link_target, check=True)
    if (entry.size < 0 or not 0 <= entry.mode <= _MODE_BITS or not 0 <= entry.uid <= _ID_MAX
            or not 0 <= entry.gid <= _ID_MAX):
        where = display(path)
        if entry.size < 0:
            raise CorruptData(f"{where}: negative size")
        raise CorruptData(f"{where}: mode or owner out of range")
    if entry.type is EntryType.FILE:
        if sum([n for _, n in entry.chunks]) != entry.size:
            raise CorruptData(f"{display(path)}: its chunks do not add up to its size")
    elif entry.chunks:
        raise CorruptData(f"{display(path)}: only files have data")
    if b"\0" in entry.link_target:
        raise CorruptData(f"{display(path)}: link target has a NUL byte")


_BAD_COMPONENTS = frozenset((b"", b".", b".."))  # an empty one: absolute, '//', trailing '/'


def _unsafe(path: bytes, check: bool = False) -> None:
    """Raise CorruptData saying why `path` is unsafe (`check`: only if it is)."""
    try:
        validate_path(path)
    except UnsafePath as exc:
        raise CorruptData(str(exc)) from None
    if not check:
        raise CorruptData(f"unsafe path {display(path)!r}")  # not reached: same rules


@dataclass
class VerifiedManifest:
    referenced: set[bytes]  # the manifest's own chunks and every chunk its entries name
    entries: list[Entry] = field(default_factory=list)  # kept only when asked for
    shareable: set[bytes] = field(default_factory=set)  # file chunks `shareable` accepted


def verify_manifest(store: Store, manifest: list[tuple[str, int]], manifest_id: str, *,
                    keep_entries: bool = False, require_file_chunks: bool = False,
                    shareable: Callable[[bytes], bool] | None = None) -> VerifiedManifest:
    """Raise `Invalid` for malformed ids, `TooLarge` for a manifest past the bound,
    `MissingChunks` for chunks the store lacks (the manifest's; with
    `require_file_chunks`, its files' too) and `CorruptData` when the bytes do not match
    `manifest_id` or an entry does not decode or validate. `shareable(path)` picks the
    files whose chunks are returned in `shareable`."""
    if not manifest or len(manifest) > MAX_IDS_PER_QUERY:
        raise Invalid(f"a manifest lists 1 to {MAX_IDS_PER_QUERY} chunks")
    ids = parse_chunk_ids([h for h, _ in manifest])
    sizes = store.raw_sizes(ids)
    lacking = [c for c in dict.fromkeys(ids) if c not in sizes]
    if lacking:
        raise MissingChunks(lacking)
    if sum(sizes[c] for c in ids) > MAX_MANIFEST_BYTES:
        raise TooLarge(f"a manifest may hold at most {MAX_MANIFEST_BYTES >> 20} MiB")
    repeated = {c for c, n in Counter(ids).items() if n > 1}
    hasher = blake3.blake3()

    def pieces() -> Iterator[bytes]:
        kept: dict[bytes, bytes] = {}  # repeated pieces: read and verified once
        for cid in ids:
            piece = kept.get(cid)
            if piece is None:
                piece = store.load_chunk(cid)
                if cid in repeated:
                    kept[cid] = piece
            hasher.update(piece)
            yield piece

    referenced: set[bytes] = set(ids)
    shared: set[bytes] = set()
    kept_entries: list[Entry] = []
    previous: tuple[bytes, ...] | None = None
    for entry in decode_manifest(pieces()):  # validates every field's type
        check_entry(entry)
        key = path_key(entry.path)
        if previous is not None and key <= previous:
            raise CorruptData(f"{display(entry.path)}: out of order or repeated")
        previous = key
        file_chunks = [c for c, _ in entry.chunks]
        referenced.update(file_chunks)
        if shareable is not None and file_chunks and shareable(entry.path):
            shared.update(file_chunks)
        if keep_entries:
            kept_entries.append(entry)
    if hasher.digest().hex() != manifest_id:
        raise CorruptData("the manifest does not match its id")
    if require_file_chunks:
        lacking = store.missing_chunks(referenced)
        if lacking:
            raise MissingChunks(lacking)
    return VerifiedManifest(referenced=referenced, entries=kept_entries, shareable=shared)

"""The one check of a manifest a client sends (a snapshot commit, a layer capture): the
chunk ids are well-formed, its chunks are held, their bytes hash to the manifest id, and
every entry decodes and validates. What the manifest references is returned, for the
store's commit to check again under its lock."""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.errors import CorruptData, Invalid, MissingChunks
from strata.model.entry import Entry
from strata.model.ids import ID_LEN, content_id
from strata.model.manifest import decode_manifest
from strata.store.repository import Store


def parse_chunk_ids(hex_ids: list[str]) -> list[bytes]:
    """Chunk ids as a client sends them (hex), checked before any of them is used."""
    try:
        out = [bytes.fromhex(h) for h in hex_ids]
    except ValueError:
        raise Invalid("chunk ids must be hex") from None
    if any(len(i) != ID_LEN for i in out):
        raise Invalid(f"chunk ids must be {ID_LEN} bytes")
    return out


@dataclass
class VerifiedManifest:
    referenced: set[bytes]  # the manifest's own chunks and every chunk its entries name
    entries: list[Entry] = field(default_factory=list)  # kept only when asked for


def verify_manifest(store: Store, manifest: list[tuple[str, int]], manifest_id: str, *,
                    keep_entries: bool = False,
                    require_file_chunks: bool = False) -> VerifiedManifest:
    """Raise `Invalid` for malformed ids, `MissingChunks` for chunks the store lacks (the
    manifest's; with `require_file_chunks`, its files' too) and `CorruptData` when the
    bytes do not match `manifest_id` or an entry does not decode."""
    ids = parse_chunk_ids([h for h, _ in manifest])
    lacking = store.missing_chunks(ids)
    if lacking:
        raise MissingChunks(lacking)
    pieces = [store.load_chunk(c) for c in ids]
    if content_id(b"".join(pieces)).hex() != manifest_id:
        raise CorruptData("the manifest does not match its id")
    referenced: set[bytes] = set(ids)
    kept: list[Entry] = []
    for entry in decode_manifest(pieces):  # validates every entry
        referenced.update(c for c, _ in entry.chunks)
        if keep_entries:
            kept.append(entry)
    if require_file_chunks:
        lacking = store.missing_chunks(referenced)
        if lacking:
            raise MissingChunks(lacking)
    return VerifiedManifest(referenced=referenced, entries=kept)

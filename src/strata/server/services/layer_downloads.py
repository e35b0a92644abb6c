"""What an agent downloads for its desired state: the manifests of the layers (or CVD
snapshots) it names, and their chunks as one compressed stream. An endpoint reads only
what is assigned to it."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import zstandard

from strata.errors import Forbidden, NotFound, TooLarge
from strata.model.transfer import MAX_STREAM_BYTES, pack_stream_pieces
from strata.server.catalog.models import Endpoint
from strata.server.context import ServerContext
from strata.server.services import snapshots
from strata.server.services.assignments import cached_desired
from strata.server.services.manifests import parse_chunk_ids

# zstd levels of download streams. A batch of IT layer content goes to every endpoint the
# layer is assigned to: the stream cache makes level 19 a one-off per batch, and the WAN
# bytes it saves are saved for each of them. An endpoint's own CVD (a restore to new
# hardware, a revert) goes to that endpoint alone: at level 19 the server compressed
# about 1 MB/s of CPU on a mixed tree and 2 MB/s on incompressible data, slower than the
# 20 Mbit/s links it serves; level 12 sent 9% more bytes than 19 on a mixed tree, at 10x
# the speed on it and 70x on incompressible data (measured with zstandard on this machine).
DOWNLOAD_LEVEL = 19
PRIVATE_LEVEL = 12
# A batch the store could not compress (media, archives, packages that are compressed
# already): level 19 spends 70 times the CPU of a low level there and saves nothing (a
# 32 MiB batch of such chunks kept a core busy 10 s, per batch, per layer).
INCOMPRESSIBLE_LEVEL = 3
INCOMPRESSIBLE = 0.95  # stored bytes at least this share of the raw bytes: did not compress
# A layer's manifest goes to every endpoint the layer is assigned to, like its chunks:
# compressed once (level 19 on a base image's 0.6 MB manifest: about 0.3 s of CPU) and
# kept with the download streams.
MANIFEST_LEVEL = 19


def stream_level(ctx: ServerContext, layer_sids: list[str], ids: list[bytes],
                 sizes: tuple[int, int]) -> int:
    """DOWNLOAD_LEVEL when every chunk of the batch belongs to one of `layer_sids` (IT
    layers, downloaded by many endpoints), else PRIVATE_LEVEL; INCOMPRESSIBLE_LEVEL for
    a batch that did not compress when it was stored (`sizes`: its snapshots.batch_sizes)."""
    stored, raw = sizes
    if ctx.store.compresses and raw and stored >= INCOMPRESSIBLE * raw:
        return INCOMPRESSIBLE_LEVEL
    if not layer_sids:
        return PRIVATE_LEVEL
    shared = ctx.holdings.in_snapshots(layer_sids, ids)
    return DOWNLOAD_LEVEL if len(shared) == len(set(ids)) else PRIVATE_LEVEL


def it_layers(ctx: ServerContext, ep: Endpoint) -> list[str]:
    """The snapshots of the IT layers (not CVD snapshots) the endpoint's desired state names."""
    desired = cached_desired(ctx, ep)
    return sorted({dl.snapshot for dl in desired.layers if dl.id is not None}) if desired else []


def allowed_snapshots(ctx: ServerContext, ep: Endpoint) -> set[str]:
    desired = cached_desired(ctx, ep)
    if desired is None:
        return set()
    return {dl.snapshot for dl in [*desired.layers, *(desired.owned or [])]}


def allowed_chunks(ctx: ServerContext, ep: Endpoint, ids: list[bytes]) -> set[bytes]:
    """Of `ids`: those in the layers and snapshots the endpoint's desired state names.
    Each one's chunks are indexed once (server/holdings.py) and looked up by query, not
    gathered from its manifest for every request."""
    sids = sorted(allowed_snapshots(ctx, ep))
    for sid in sids:
        ctx.holdings.index_snapshot(sid, functools.partial(ctx.snapshot_chunks, sid))
    return ctx.holdings.in_snapshots(sids, ids)


def layer_manifest(ctx: ServerContext, ep: Endpoint, sid: str) -> bytes:
    """The zstd-compressed manifest of a layer or snapshot the endpoint's desired state
    names (a manifest is highly redundant: compressed it is a fraction)."""
    if sid not in allowed_snapshots(ctx, ep):
        # Not assigned to this endpoint: reported like a layer that does not exist.
        raise NotFound(f"no layer or snapshot {sid[:8]} assigned to this endpoint")
    # Named apart from any set of chunk ids (theirs are 32 bytes each); a snapshot's
    # manifest never changes.
    level = MANIFEST_LEVEL
    return ctx.streams.kept(
        ctx.streams.key(level, [b"layer manifest " + sid.encode()]),
        lambda: zstandard.ZstdCompressor(level=level).compress(
            snapshots.manifest_bytes(ctx, sid, "layer")))


def layer_chunks(ctx: ServerContext, ep: Endpoint, hex_ids: list[str]) -> bytes:
    """Chunks of the endpoint's assigned layers, as one zstd stream (`layer_chunk_stream`
    read to the end)."""
    return b"".join(layer_chunk_stream(ctx, ep, hex_ids))


def layer_chunk_stream(ctx: ServerContext, ep: Endpoint, hex_ids: list[str]
                       ) -> Iterator[bytes]:
    """Chunks of the endpoint's assigned layers, as one zstd stream, handed on piece by
    piece as it is compressed. The server alone picks the level (a client asking for the
    costliest would be a denial of service) and keeps the stream: the next endpoint asking
    for the same batch costs no compression. Every check, and the reading of the chunks,
    is done before the first piece: a refusal or an unreadable chunk is this answer's
    status, not a broken stream."""
    ids = list(dict.fromkeys(parse_chunk_ids(hex_ids)))
    if len(allowed_chunks(ctx, ep, ids)) < len(ids):
        raise Forbidden("a requested chunk is not part of this endpoint's layers")
    # Only then the size: summed over chunks the endpoint may not read, it would tell
    # (413 or not) whether the server holds them.
    sizes = snapshots.batch_sizes(ctx, ids)

    def load() -> list[tuple[bytes, bytes]]:
        chunks, total = [], 0
        for cid in ids:
            raw = ctx.store.load_chunk(cid)  # verified against its id on the way out
            total += len(raw)
            if total > MAX_STREAM_BYTES:
                raise TooLarge(f"ask for at most {MAX_STREAM_BYTES} bytes of chunks per "
                               "request")
            chunks.append((cid, raw))
        return chunks

    level = stream_level(ctx, it_layers(ctx, ep), ids, sizes)
    return ctx.streams.stream(level, ids, lambda: pack_stream_pieces(load(), level))

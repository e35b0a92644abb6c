"""A snapshot's manifest sent as a delta against the endpoint's last one (or a layer's).

Between two centralizations a manifest changes in a few entries, but they are spread
across it: a file changed here and there touches most of the manifest's chunks, and the
whole manifest would travel again by chunks. As a zstd delta against the last manifest
(strata.engine.delta, the same codec as file deltas) it is a few kilobytes. The server
holds that manifest too (it is the endpoint's own latest snapshot), rebuilds the new
one, checks it against its id and stores it; the commit then names its chunks like any.
Whatever goes wrong (no last snapshot, an older server, a refusal) only means the
manifest goes by chunks, as before.
"""

from __future__ import annotations

from strata.agent.client import ServerClient, parse_answer
from strata.agent.state import AgentState
from strata.engine.backup import Archive
from strata.engine.delta import MAX_DELTA_BYTES, GroupDelta, encode, pack_deltas
from strata.errors import CorruptData, StrataError
from strata.model.ids import content_id, is_hex_id
from strata.model.manifest import decode_manifest, encode_manifest
from strata.model.wire import CheckinResponse, ManifestUploadResponse

# zstd level of a manifest delta: the agent pays for it at every centralization; 9 makes
# deltas within 15% of level 19's on a real tree at a fifth of its CPU.
MANIFEST_DELTA_LEVEL = 9


def as_stored(local_manifest: bytes) -> bytes:
    """The manifest the server stored for a local one (the same entries, no stat keys)."""
    return b"".join(encode_manifest(decode_manifest([local_manifest]), stat_keys=False))


def pick_base(state: AgentState, info: CheckinResponse) -> tuple[str, bytes] | None:
    """What to patch from, as the server stored it: the last snapshot when it is still the
    server's head (the files cache, stat keys left out); else, for a first centralization
    (or after a restore or provisioning), the largest manifest kept here of the layers and
    snapshots the desired state names: a machine laid down from a base layer, or restored
    from a snapshot, is mostly that manifest. The server patches from nothing else."""
    sid, local = state.parent()
    if sid is not None and local is not None and sid == info.last_snapshot \
            and len(local) <= 2 * MAX_DELTA_BYTES:
        try:
            return sid, as_stored(local)
        except CorruptData:
            pass
    kept = _desired(state, info)
    return max(kept, key=lambda k: len(k[1])) if kept else None


def desired_manifests(state: AgentState, info: CheckinResponse) -> list[bytes]:
    """The manifests kept here of the layers and snapshots the desired state names."""
    return [data for _, data in _desired(state, info)]


def _desired(state: AgentState, info: CheckinResponse) -> list[tuple[str, bytes]]:
    desired = info.desired
    sids = [dl.snapshot for dl in [*desired.layers, *(desired.owned or [])]] if desired else []
    out = []
    for sid in dict.fromkeys(sids):
        data = _kept_manifest(state, sid)
        if data is not None:
            out.append((sid, data))
    return out


def _kept_manifest(state: AgentState, sid: str) -> bytes | None:
    """A layer's (or snapshot's) manifest this agent downloaded and verified."""
    if not is_hex_id(sid):
        return None
    path = state.path / "layers" / f"{sid}.manifest"
    try:
        if path.stat().st_size > MAX_DELTA_BYTES:
            return None
        return path.read_bytes()
    except OSError:
        return None


def send_manifest_delta(client: ServerClient, base: tuple[str, bytes] | None,
                        archive: Archive, api: str = "/api/v1/agent") -> bool:
    """Store `archive`'s manifest on the server as a delta against `base` (a snapshot id
    and its manifest as stored); True once the server holds it in exactly the chunks
    `archive.manifest` lists, False to send it by chunks instead."""
    new = archive.manifest_bytes
    if base is None or len(new) > MAX_DELTA_BYTES or len(base[1]) > MAX_DELTA_BYTES:
        return False
    base_sid, old = base
    if old == new:  # nothing changed: its chunks are held, asking costs a few ids
        return False
    body = pack_deltas([GroupDelta(content_id(old), content_id(new), len(new),
                                   encode(old, new, MANIFEST_DELTA_LEVEL))])
    try:
        resp = client.request("POST", f"{api}/manifests?base={base_sid}", content=body)
        answer = parse_answer(resp, ManifestUploadResponse)
    except StrataError:  # an older server, a base it no longer has: by chunks
        return False
    return answer.manifest_id == content_id(new).hex() and \
        [(bytes.fromhex(h), n) for h, n in answer.manifest] == archive.manifest

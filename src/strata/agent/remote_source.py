"""Reading the endpoint's own snapshots back from the server, for file restore."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from strata.agent.client import ServerClient
from strata.agent.resume import fetch_chunks
from strata.errors import CorruptData
from strata.model.entry import Entry
from strata.model.ids import is_hex_id
from strata.model.manifest import decode_manifest
from strata.model.transfer import iter_bundle


@dataclass
class RemoteSnapshot:
    id: str
    manifest: bytes


class RemoteSource:
    """A ChunkSource over the agent API; every chunk is verified against its id."""

    def __init__(self, client: ServerClient):
        self.client = client
        self._sid = ""

    def snapshot(self, ref: str) -> RemoteSnapshot:
        """Fetch a snapshot's manifest; chunks are then read from that snapshot."""
        resp = self.client.request("GET", f"/api/v1/agent/snapshots/{ref}/manifest")
        sid = resp.headers.get("X-Strata-Snapshot", "")
        if not is_hex_id(sid):  # it goes into the next URLs
            raise CorruptData("the server named the snapshot with something other than an id")
        snap = RemoteSnapshot(sid, resp.content)
        self._sid = snap.id
        return snap

    def iter_manifest(self, snap: RemoteSnapshot) -> Iterator[Entry]:
        return decode_manifest([snap.manifest])

    def load_chunks(self, ids: list[bytes]) -> list[bytes | CorruptData]:
        """Read as the answer arrives (the bandwidth cap holds on the stream), resuming a
        broken connection for the chunks still missing (agent/resume.py)."""
        got: dict[bytes, bytes | CorruptData] = {}
        fetch_chunks(self.client, f"/api/v1/agent/snapshots/{self._sid}/chunks",
                     list(dict.fromkeys(ids)), got.__setitem__, decode=iter_bundle,
                     on_corrupt=got.__setitem__)
        return [got.get(c, CorruptData(f"server did not send chunk {c.hex()[:16]}"))
                for c in ids]

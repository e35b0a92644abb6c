"""Reading the endpoint's own snapshots back for file restore: the manifest from the
server, the chunks from the branch reflector the last check-in named (if any, with its
ticket: agent/reflector_source.py), and whatever it does not deliver from the server."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from strata.agent.client import ServerClient
from strata.agent.reflector_source import ReflectorFetcher
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

    def __init__(self, client: ServerClient, reflectors: ReflectorFetcher | None = None):
        self.client = client
        self.reflectors = reflectors
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
        path = f"/api/v1/agent/snapshots/{self._sid}/chunks"
        want = list(dict.fromkeys(ids))
        if self.reflectors is not None:  # the branch first; what it did not deliver: below
            want = self.reflectors.fetch(path, want, got.__setitem__, decode=iter_bundle)
        if want:
            fetch_chunks(self.client, path, want, got.__setitem__, decode=iter_bundle,
                         on_corrupt=got.__setitem__)
        return [got.get(c, CorruptData(f"server did not send chunk {c.hex()[:16]}"))
                for c in ids]

"""The reflector's side of its channel to the server: its own credential, the agent's HTTP
client (retries, byte counts, pinned TLS) and the agent's resumable chunk download,
reused rather than copied."""

from __future__ import annotations

from collections.abc import Callable

import zstandard

from strata.agent.client import ServerClient, parse_answer
from strata.agent.location import local_subnet, utc_offset_minutes
from strata.agent.resume import fetch_chunks
from strata.errors import CorruptData
from strata.model.ids import ID_LEN, content_id
from strata.model.reflector import MAX_DELTA_BODY, ReflectorPoll, ReflectorStats
from strata.model.reflector import ReflectorConfig as ServerAnswer
from strata.reflector.state import ReflectorConfig

API = "/api/v1/reflector"
MAX_CHUNK_IDS = 64 << 20  # bytes of ids a chunk list may inflate to (2 million chunks)


class Upstream:
    def __init__(self, cfg: ReflectorConfig, *, retries: int = 3, timeout: float = 120.0):
        self.server = cfg.server
        self.client = ServerClient(cfg.server, cfg.credential, retries=retries,
                                   timeout=timeout, verify=cfg.verify)

    def close(self) -> None:
        self.client.close()

    @property
    def bytes_received(self) -> int:
        return self.client.bytes_received

    def poll(self, stats: ReflectorStats, site: str | None = None) -> ServerAnswer:
        """Report the counters and where this reflector is; the server answers with its
        status, the layers to warm and the bandwidth caps for its site and subnet, which
        every fetch from here on follows (by this host's clock, as an agent does)."""
        body = ReflectorPoll(**stats.model_dump(), site=site,
                             subnet=local_subnet(self.server),
                             utc_offset_minutes=utc_offset_minutes())
        resp = self.client.request("POST", f"{API}/poll", json=body.model_dump(), retries=1)
        answer = parse_answer(resp, ServerAnswer)
        self.client.follow(answer.bandwidth, None)
        return answer

    def chunk_ids(self, sid: str, ticket: str = "") -> list[bytes]:
        """The chunks a layer or snapshot needs, in its tree's order, as the server lists
        them for this ticket (or for warm-up)."""
        resp = self.client.request("POST", f"{API}/snapshots/{sid}/chunk-ids",
                                   json={"ticket": ticket})
        try:
            raw = zstandard.ZstdDecompressor().stream_reader(resp.content).read(
                MAX_CHUNK_IDS + 1)
        except zstandard.ZstdError as exc:
            raise CorruptData(f"the server's chunk list does not decompress: {exc}") from None
        if len(raw) > MAX_CHUNK_IDS or len(raw) % ID_LEN:
            raise CorruptData("the server's chunk list is malformed")
        return [raw[i:i + ID_LEN] for i in range(0, len(raw), ID_LEN)]

    def check_chunks(self, sid: str, ids: list[bytes], ticket: str) -> None:
        """Whether the ticket's endpoint owns snapshot `sid` and it holds every one of
        `ids` (ServerRefused 403/404 if not): a file restore's request, checked alone."""
        self.client.request("POST", f"{API}/snapshots/{sid}/check-chunks",
                            json={"ticket": ticket, "ids": [c.hex() for c in ids]})

    def fetch(self, ids: list[bytes], keep: Callable[[bytes, bytes], None], *,
              ticket: str = "", snapshot: str | None = None) -> list[bytes]:
        """Download `ids` into `keep` (each verified against its id as it arrives); the
        ids the server did not send."""
        extra: dict[str, object] = {"ticket": ticket}
        if snapshot:
            extra["snapshot"] = snapshot
        return fetch_chunks(self.client, f"{API}/chunks", ids, keep, extra=extra)

    def delta(self, did: bytes, ticket: str) -> bytes:
        """A file delta's body, by id, for an endpoint's delta ticket; CorruptData if what
        the server sent is not the body `did` names (never cached, never served)."""
        with self.client.stream("POST", f"{API}/deltas/{did.hex()}",
                                json={"ticket": ticket}) as body:
            parts, got = [], 0
            while got <= MAX_DELTA_BODY and (part := body.read()):
                parts.append(part)
                got += len(part)
        data = b"".join(parts)
        if got > MAX_DELTA_BODY or content_id(data) != did:
            raise CorruptData(f"the server's delta {did.hex()[:16]} does not match its id")
        return data

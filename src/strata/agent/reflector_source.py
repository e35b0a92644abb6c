"""Downloads through the branch reflector: the agent asks the reflector(s) its check-in
named first, with its ticket, on the same routes and in the same formats as the server's
(agent/resume.py reads both); whatever a reflector does not deliver (it is down, too
slow, refuses, or sends a chunk that fails its id) comes from the server instead, and the
server hears of it (a bad chunk takes the reflector out of rotation).

The route and ticket of the last check-in are kept in STATE/reflector.json, so a
download resumed by `agent apply` uses them too; a ticket about to expire is renewed.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime

from strata.agent.client import ServerClient, ServerRefused, ServerUnreachable, parse_answer
from strata.agent.resume import Decoder, fetch_chunks
from strata.agent.state import AgentState
from strata.errors import CorruptData, StrataError
from strata.model.ids import content_id
from strata.model.reflector import ReflectorAssignment, ReflectorRoute
from strata.model.tickets import TicketRefused, parse_ticket
from strata.model.transfer import iter_stream
from strata.store.backend import atomic_write

ROUTE_FILE = "reflector.json"
# Seconds without a byte from a reflector before the server takes over. A cold miss costs
# the reflector a fetch over the WAN first (in slices of some 8 MiB: seconds, even on a
# thin link), so this is not much shorter than the server's own timeout.
TIMEOUT = 60.0
RENEW_BEFORE = 120  # seconds: a ticket closer than this to its end is renewed first


class BadChunk(CorruptData):
    def __init__(self, cid: bytes, why: CorruptData):
        super().__init__(f"chunk {cid.hex()[:16]} failed its check: {why}")
        self.cid = cid


def save_route(state: AgentState, route: ReflectorRoute | None) -> None:
    """What the check-in said (None: no reflector, download from the server)."""
    path = state.path / ROUTE_FILE
    if route is None or not route.reflectors:
        path.unlink(missing_ok=True)
        return
    atomic_write(path, route.model_dump_json().encode(), durable=False)
    path.chmod(0o600)  # the ticket reads this endpoint's layers: keep it to the agent


def load_route(state: AgentState) -> ReflectorRoute | None:
    try:
        return ReflectorRoute.model_validate(json.loads((state.path / ROUTE_FILE).read_text()))
    except (OSError, ValueError):
        return None


class ReflectorFetcher:
    """Fetch chunks from the route's reflectors, in order; a reflector that failed once
    is not asked again by this fetcher (the next download tries it again)."""

    def __init__(self, server: ServerClient, state: AgentState, route: ReflectorRoute, *,
                 timeout: float = TIMEOUT, clock: Callable[[], float] = time.time):
        self.server = server
        self.state = state
        self.route = route
        self.timeout = timeout
        self.clock = clock
        self.failed: dict[str, str] = {}  # reflector id -> why
        self.bytes_received = 0
        self.chunks_received = 0
        self.deltas_received = 0
        self._clients: dict[str, ServerClient] = {}

    @classmethod
    def for_state(cls, server: ServerClient | None, state: AgentState
                  ) -> ReflectorFetcher | None:
        route = load_route(state)
        if server is None or route is None or not route.reflectors:
            return None
        return cls(server, state, route)

    def close(self) -> None:
        for client in self._clients.values():
            self.bytes_received += client.bytes_received
            client.close()
        self._clients.clear()

    def fetch(self, path: str, ids: list[bytes], keep: Callable[[bytes, bytes], None], *,
              decode: Decoder = iter_stream) -> list[bytes]:
        """Ask the reflectors for `ids` on `path`; each chunk verified is handed to
        `keep`. Returns what is still missing, for the server."""
        done: set[bytes] = set()

        def kept(cid: bytes, data: bytes) -> None:
            keep(cid, data)
            done.add(cid)
            self.chunks_received += 1

        for refl in self.route.reflectors:
            rest = [c for c in ids if c not in done]
            if not rest:
                break
            if refl.id in self.failed:
                continue
            try:
                self._renew_if_due()
                fetch_chunks(self._client(refl), path, rest, kept, decode=decode,
                             on_corrupt=_abort)
            except BadChunk as exc:
                self._went_around(refl, "corrupt", str(exc), exc.cid)
            except CorruptData as exc:  # a malformed stream: bad data as well
                self._went_around(refl, "corrupt", str(exc))
            except ServerUnreachable as exc:
                slow = "timed out" in str(exc).lower() or "timeout" in str(exc).lower()
                self._went_around(refl, "slow" if slow else "down", str(exc))
            except ServerRefused as exc:
                self._went_around(refl, "refused", str(exc))
        return [c for c in ids if c not in done]

    def usable(self) -> list[str]:
        """The route's reflectors not yet gone around in this download."""
        return [r.id for r in self.route.reflectors if r.id not in self.failed]

    def fetch_delta(self, did: bytes, size: int, ticket: str) -> bytes | None:
        """A file delta's body by id, from the first reflector that delivers one that is
        `size` bytes and hashes to `did`, with the delta ticket the server signed for it;
        None if none does (each failure reported, as for chunks)."""
        try:
            named = parse_ticket(ticket)[0].reflectors
        except TicketRefused:
            return None
        for refl in self.route.reflectors:
            if refl.id in self.failed or refl.id not in named:
                continue
            client = self._make_client(refl, ticket)
            try:
                with client.stream("GET", f"/api/v1/agent/deltas/{did.hex()}") as body:
                    parts, got = [], 0
                    while got <= size and (part := body.read()):
                        parts.append(part)
                        got += len(part)
                data = b"".join(parts)
                if len(data) != size or content_id(data) != did:
                    self._went_around(refl, "corrupt", f"delta {did.hex()[:16]} does not "
                                      "match its id", did)
                    continue
                self.deltas_received += 1
                return data
            except ServerUnreachable as exc:
                slow = "timed out" in str(exc).lower() or "timeout" in str(exc).lower()
                self._went_around(refl, "slow" if slow else "down", str(exc))
            except StrataError as exc:  # refused (an expired ticket), or an odd answer
                self._went_around(refl, "refused", str(exc))
            finally:
                self.bytes_received += client.bytes_received
                client.close()
        return None

    def _client(self, refl: ReflectorAssignment) -> ServerClient:
        client = self._clients.get(refl.id)
        if client is None:
            client = self._clients[refl.id] = self._make_client(refl, self.route.ticket)
        return client

    def _make_client(self, refl: ReflectorAssignment, ticket: str) -> ServerClient:
        from strata.transport import system_trust, verify_setting

        # The reflector's certificate as the server vouched for it; no retries: on any
        # trouble the server is asked at once, the reflector again at the next download.
        verify = verify_setting(pinned_pem=refl.tls_cert) if refl.tls_cert else system_trust()
        return ServerClient(refl.url, ticket, retries=0, timeout=self.timeout, verify=verify)

    def _renew_if_due(self) -> None:
        expires = self.route.expires
        if expires is None or expires.timestamp() - self.clock() > RENEW_BEFORE:
            return
        from strata.agent.location import local_subnet, read_site

        resp = self.server.request("POST", "/api/v1/agent/reflector-ticket", retries=1, json={
            "site": read_site(self.state.path), "subnet": local_subnet(self.server.server)})
        if resp.content.strip() in (b"", b"null"):
            raise ServerRefused(404, "the server no longer sends this endpoint to a reflector")
        route = parse_answer(resp, ReflectorRoute)
        save_route(self.state, route)
        self.route = route
        self.close()  # the clients carry the old ticket

    def _went_around(self, refl: ReflectorAssignment, problem: str, detail: str,
                     chunk: bytes | None = None) -> None:
        self.failed[refl.id] = f"{problem}: {detail}"
        with contextlib.suppress(StrataError):  # the download goes on either way
            self.server.request("POST", "/api/v1/agent/reflector-report", retries=1, json={
                "reflector_id": refl.id, "problem": problem, "detail": detail[:500],
                "chunk": chunk.hex() if chunk else None})

    def summary(self) -> dict:
        return {"bytes_from_reflector": self.bytes_received + sum(
                    c.bytes_received for c in self._clients.values()),
                "chunks_from_reflector": self.chunks_received,
                "deltas_from_reflector": self.deltas_received,
                "reflector_failures": dict(self.failed),
                "at": datetime.now(UTC).isoformat()}


def _abort(cid: bytes, exc: CorruptData) -> None:
    """A chunk from a reflector that fails its check ends that reflector's part at once."""
    raise BadChunk(cid, exc)

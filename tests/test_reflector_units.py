"""The branch reflector's pieces without processes: tickets (signed, bound to an endpoint,
a reflector and an expiry, refused otherwise), the `reflectors` policy, the bounded chunk
cache (verified, least recently used out), and the service's single flight (one fetch
from the server however many agents ask at once, for chunks and file deltas) and
authorization."""

from __future__ import annotations

import base64
import json
import random
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.agent.client import ServerRefused
from strata.agent.reflector_source import ReflectorFetcher
from strata.agent.state import AgentState
from strata.engine.delta import DELTA_LEVEL
from strata.errors import CorruptData
from strata.model.ids import content_id
from strata.model.reflector import ReflectorAssignment, ReflectorRoute
from strata.model.tickets import Ticket, TicketRefused, TicketSigner, parse_ticket, verify_ticket
from strata.reflector.cache import ChunkCache
from strata.reflector.service import NotAllowed, ReflectorService
from strata.server.policies import reflectors_for, validate_policy
from strata.server.services.deltas import _ALONE, DeltaService
from tier import examples

NOW = 1_800_000_000
RID = "11111111-2222-3333-4444-555555555555"
LAYER = "ab" * 32
OWN = "cd" * 32


def ticket(**changes: object) -> Ticket:
    fields: dict = {"endpoint": "ep-1", "reflectors": (RID,), "snapshots": frozenset({LAYER}),
                    "own_cvd": True, "issued": NOW, "expires": NOW + 3600}
    fields.update(changes)
    return Ticket(**fields)


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> TicketSigner:
    return TicketSigner(tmp_path_factory.mktemp("keys") / "tickets.key")


# -- tickets ------------------------------------------------------------------------------


def test_a_ticket_verifies_only_for_its_reflector_until_it_expires(signer, tmp_path):
    text = signer.sign(ticket())
    assert verify_ticket(text, signer.public_key, reflector=RID, now=NOW) == ticket()
    with pytest.raises(TicketRefused, match="not for this reflector"):
        verify_ticket(text, signer.public_key, reflector="another", now=NOW)
    with pytest.raises(TicketRefused, match="expired"):
        verify_ticket(text, signer.public_key, reflector=RID, now=NOW + 3600)
    other = TicketSigner(tmp_path / "other.key")
    with pytest.raises(TicketRefused, match="signature"):
        verify_ticket(other.sign(ticket()), signer.public_key, reflector=RID, now=NOW)
    assert (tmp_path / "other.key").stat().st_mode & 0o077 == 0


def test_a_ticket_changed_after_signing_is_refused(signer):
    body, sig = signer.sign(ticket()).split(".")
    widened = signer.sign(ticket(snapshots=frozenset({LAYER, OWN}))).split(".")[0]
    with pytest.raises(TicketRefused):
        verify_ticket(f"{widened}.{sig}", signer.public_key, reflector=RID, now=NOW)


@settings(max_examples=examples(300), deadline=None)
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.hex() + "." + b.hex()))
def test_any_text_is_a_ticket_or_one_refusal(text):
    try:
        parse_ticket(text)
    except TicketRefused:
        pass


def test_malformed_tickets_are_refused(signer):
    body, sig = signer.sign(ticket()).split(".")
    for bad in ("", ".", "a.b.c", "x" * 20_000, f"{body}.!!", f"{sig}.{sig}"):
        with pytest.raises(TicketRefused):
            verify_ticket(bad, signer.public_key, reflector=RID, now=NOW)


# -- the policy ----------------------------------------------------------------------------


def test_the_reflectors_policy_is_validated_and_matched_first_rule_first():
    doc = {"rules": [{"subnet": "10.20.0.0/16", "reflectors": ["a", "b"]},
                     {"site": "lyon", "reflectors": ["c"]}]}
    assert validate_policy("reflectors", doc) == doc
    rules = doc["rules"]
    assert reflectors_for(rules, ["10.20.3.4/24"], "lyon") == ["a", "b"]
    assert reflectors_for(rules, ["10.30.3.4"], "lyon") == ["c"]
    assert reflectors_for(rules, ["10.30.3.4"], "paris") == []
    for bad, why in (({"rules": [{"reflectors": ["a"]}]}, "subnet or a site"),
                     ({"rules": [{"site": "x", "reflectors": []}]}, "1 to 8"),
                     ({"rules": [{"site": "x", "reflectors": ["a"] * 9}]}, "1 to 8"),
                     ({"rules": [{"subnet": "10.0.0.300/8", "reflectors": ["a"]}]}, "subnet"),
                     ({"rules": [{"site": "x", "reflectors": ["a"], "speed": 1}]}, "unknown"),
                     ({"rules": "all"}, "list"), ({"rulez": []}, "unknown")):
        with pytest.raises(ValueError, match=why):
            validate_policy("reflectors", bad)


# -- the cache -------------------------------------------------------------------------------


def chunks(n: int, size: int, seed: int) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        data = rng.randbytes(size)
        out.append((content_id(data), data))
    return out


def test_the_cache_keeps_only_chunks_that_match_their_id(tmp_path):
    cache = ChunkCache(tmp_path / "cache", 64 << 20)
    try:
        good, = chunks(1, 1000, 1)
        with pytest.raises(CorruptData):
            cache.put_many([good, (good[0], b"not it")])
        assert cache.get(good[0]) is None  # nothing of the batch was kept
        cache.put_many([good])
        assert cache.get(good[0]) == good[1]
    finally:
        cache.close()


def test_the_cache_stays_within_its_size_evicting_the_least_recently_used(tmp_path):
    cache = ChunkCache(tmp_path / "cache", 16 << 20)  # the smallest
    try:
        puts = [chunks(15, 256 << 10, seed) for seed in range(5)]  # 3.75 MiB: a pack each
        cache.put_many(puts[0])
        cache.put_many(puts[1])
        assert all(cache.get(cid) is not None for cid, _ in puts[0])  # used again
        for batch in puts[2:]:
            cache.put_many(batch)
            assert cache.stored_bytes() <= cache.limit
        assert all(cache.get(cid) is None for cid, _ in puts[1])  # least recently used
        assert all(cache.get(cid) is not None for cid, _ in puts[0])
        assert all(cache.get(cid) is not None for cid, _ in puts[4])
        assert cache.evicted_bytes >= 15 * (256 << 10)
    finally:
        cache.close()


# -- the service -----------------------------------------------------------------------------


class FakeUpstream:
    """The server as the reflector sees it: chunk lists per snapshot, chunks on request
    (optionally held until released, or altered)."""

    def __init__(self, sets: dict[str, list[bytes]], data: dict[bytes, bytes]):
        self.sets, self.data = sets, data
        self.fetched: list[list[bytes]] = []
        self.entered, self.release = threading.Event(), threading.Event()
        self.release.set()
        self.alter = False
        self.bytes_received = 0
        self.deltas: dict[bytes, bytes] = {}
        self.checked: list[tuple[str, list[bytes]]] = []
        self.deltas_fetched: list[bytes] = []

    def chunk_ids(self, sid: str, ticket: str = "") -> list[bytes]:
        if sid not in self.sets:
            raise ServerRefused(404, "server refused (404): no such snapshot")
        return self.sets[sid]

    def check_chunks(self, sid: str, ids: list[bytes], ticket: str) -> None:
        self.checked.append((sid, list(ids)))
        if sid not in self.sets or not set(ids) <= set(self.sets[sid]):
            raise ServerRefused(404, "server refused (404): no such snapshot")

    def fetch(self, ids: list[bytes], keep: Callable[[bytes, bytes], None], *,
              ticket: str = "", snapshot: str | None = None) -> list[bytes]:
        self.fetched.append(list(ids))
        self.entered.set()
        assert self.release.wait(30)
        for cid in ids:
            data = self.data[cid]
            keep(cid, b"X" + data[1:] if self.alter else data)
            self.bytes_received += len(data)
        return []


    def delta(self, did: bytes, ticket: str) -> bytes:
        self.deltas_fetched.append(did)
        self.entered.set()
        assert self.release.wait(30)
        data = self.deltas[did]
        self.bytes_received += len(data)
        return b"X" + data[1:] if self.alter else data


@pytest.fixture
def world(tmp_path, signer):
    data = dict(chunks(8, 5000, 7))
    ids = list(data)
    upstream = FakeUpstream({LAYER: ids[:6]}, data)
    cache = ChunkCache(tmp_path / "cache", 64 << 20)
    service = ReflectorService(RID, signer.public_key, cache, upstream,  # type: ignore[arg-type]
                               clock=lambda: NOW)
    yield service, upstream, ids, signer.sign(ticket())
    upstream.release.set()
    service.close()  # its fetch threads end before the cache closes
    cache.close()


def other_agents(signer: TicketSigner, n: int) -> list[str]:
    return [signer.sign(ticket(endpoint=f"ep-{i + 2}")) for i in range(n)]


def test_many_agents_asking_at_once_cost_one_fetch_per_chunk(world, signer):
    service, upstream, ids, text = world
    upstream.release.clear()
    results: list[list[tuple[bytes, bytes]]] = []
    leader = threading.Thread(target=lambda: results.append(service.serve(ids[:4], text)))
    leader.start()
    assert upstream.entered.wait(30)  # the first one is fetching now
    followers = [threading.Thread(target=lambda t=t: results.append(service.serve(ids[:4], t)))
                 for t in other_agents(signer, 4)]
    for t in followers:
        t.start()
    deadline = time.monotonic() + 30
    while service.counters.misses < 20:  # all five are waiting for the one fetch
        assert time.monotonic() < deadline
        threading.Event().wait(0.01)
    upstream.release.set()
    for t in [leader, *followers]:
        t.join(30)
    assert upstream.fetched == [ids[:4]]  # once, however many asked
    while service._inflight:  # released once the cache has them (durable)
        assert time.monotonic() < deadline
        threading.Event().wait(0.01)
    assert len(results) == 5 and all([c for c, _ in r] == ids[:4] for r in results)
    assert service.serve(ids[:4], text) and upstream.fetched == [ids[:4]]  # now a hit
    assert service.counters.hits == 4


def test_a_ticket_reads_only_the_chunks_of_what_it_names(world):
    service, upstream, ids, text = world
    with pytest.raises(NotAllowed):
        service.serve([ids[6]], text)  # a chunk of no snapshot the ticket names
    with pytest.raises(NotAllowed):
        service.serve([ids[0]], text, snapshot=OWN)  # the server does not confirm it
    with pytest.raises(TicketRefused):
        service.serve([ids[0]], text.replace(".", ".A", 1))
    assert upstream.fetched == []
    assert service.counters.refused == 3
    # The endpoint's own snapshot (a file restore): each request checked by the server,
    # its ids alone, never the snapshot's whole chunk list.
    upstream.sets[OWN] = ids[6:]
    assert [c for c, _ in service.serve([ids[7]], text, snapshot=OWN)] == [ids[7]]
    with pytest.raises(NotAllowed):
        service.serve([ids[0]], text, snapshot=OWN)  # not a chunk of that snapshot
    assert upstream.checked[-2:] == [(OWN, [ids[7]]), (OWN, [ids[0]])]
    assert not any(sid == OWN for _, sid in service._sets)  # no chunk list was fetched


def test_a_chunk_the_server_sends_wrong_is_never_cached_or_served(world):
    service, upstream, ids, text = world
    upstream.alter = True
    with pytest.raises(CorruptData):
        service.serve(ids[:2], text)
    assert service.cache.missing(ids[:2]) == ids[:2]
    upstream.alter = False
    assert [c for c, _ in service.serve(ids[:2], text)] == ids[:2]


def test_a_delta_is_fetched_once_for_many_agents_and_only_with_a_ticket_naming_it(world,
                                                                                   signer):
    service, upstream, ids, text = world
    body = random.Random(3).randbytes(3000)
    did = content_id(body)
    upstream.deltas[did] = body
    tickets = [signer.sign(ticket(endpoint=f"ep-{i}", snapshots=frozenset(), own_cvd=False,
                                  expires=NOW + 600, deltas=frozenset({did.hex()})))
               for i in range(4)]
    assert parse_ticket(tickets[0])[0].deltas == {did.hex()}
    upstream.release.clear()
    results: list[bytes] = []
    leader = threading.Thread(target=lambda: results.append(service.delta(did, tickets[0])))
    leader.start()
    assert upstream.entered.wait(30)
    followers = [threading.Thread(target=lambda t=t: results.append(service.delta(did, t)))
                 for t in tickets[1:]]
    for t in followers:
        t.start()
    deadline = time.monotonic() + 30
    while service.counters.misses < 4:  # all four wait for the one fetch
        assert time.monotonic() < deadline
        threading.Event().wait(0.01)
    upstream.release.set()
    for t in [leader, *followers]:
        t.join(30)
    assert results == [body] * 4 and upstream.deltas_fetched == [did]
    assert service.delta(did, tickets[1]) == body and upstream.deltas_fetched == [did]
    assert service.counters.deltas_from_server == 1 and service.counters.hits == 1
    # A read ticket names no delta; a delta ticket names only its own.
    with pytest.raises(NotAllowed, match="that delta"):
        service.delta(did, text)
    with pytest.raises(NotAllowed, match="that delta"):
        service.delta(content_id(b"another"), tickets[0])
    assert service.counters.refused == 2


def test_a_delta_the_server_sends_wrong_is_never_cached_or_served(world, signer):
    service, upstream, ids, text = world
    body = random.Random(4).randbytes(3000)
    did = content_id(body)
    upstream.deltas[did] = body
    upstream.alter = True
    t = signer.sign(ticket(snapshots=frozenset(), deltas=frozenset({did.hex()})))
    with pytest.raises(CorruptData):
        service.delta(did, t)
    assert service.cache.get(did) is None and not service._inflight
    upstream.alter = False
    assert service.delta(did, t) == body


def test_a_ticket_naming_malformed_or_too_many_deltas_is_refused(signer):
    for deltas in (["xyz"], ["AB" * 32], ["ab" * 32] * 65):
        body = signer.sign(ticket()).split(".")[0]
        doc = json.loads(base64.urlsafe_b64decode(body + "=="))
        doc["d"] = deltas
        forged = base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()
        with pytest.raises(TicketRefused, match="malformed"):
            parse_ticket(f"{forged}.AAAA")


def test_path_is_not_part_of_the_cache(tmp_path: Path):
    # A cache folder that holds something else is refused, not taken over.
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="not empty"):
        ChunkCache(tmp_path / "cache", 64 << 20)


def test_the_server_finds_an_offered_delta_by_its_id_and_never_another(tmp_path):
    service = DeltaService(tmp_path / "deltas")
    delta = random.Random(5).randbytes(2000)
    key = service.cache.key(DELTA_LEVEL, [content_id(b"old"), content_id(b"new")])
    service.cache.keep(key, _ALONE.pack(9000) + delta)
    did = content_id(delta)
    service.note_id(did, key)
    assert service.by_id(did) == delta
    assert service.by_id(content_id(b"never offered")) is None
    # A pointer to an entry that holds another body (a collision, a bug): refused.
    service.note_id(content_id(b"other"), key)
    assert service.by_id(content_id(b"other")) is None
    # The entry evicted or damaged: gone (the reflector fails, the agent asks the server).
    (tmp_path / "deltas" / key).write_bytes(b"\0" * 64)
    assert service.by_id(did) is None


class RecordingServer:
    """The agent's client to the server, as far as a reflector's fallback needs it: the
    reports it is sent."""

    server = "http://127.0.0.1:9"

    def __init__(self) -> None:
        self.reports: list[dict] = []

    def request(self, method: str, path: str, **kw: object) -> None:
        assert path == "/api/v1/agent/reflector-report"
        self.reports.append(kw["json"])  # type: ignore[arg-type]


def test_an_agent_goes_around_a_reflector_that_is_down_for_a_delta_and_says_so(tmp_path,
                                                                               signer):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    route = ReflectorRoute(reflectors=[ReflectorAssignment(id=RID,
                                                           url=f"http://127.0.0.1:{port}")],
                           ticket=signer.sign(ticket()))
    server = RecordingServer()
    fetcher = ReflectorFetcher(server, AgentState(tmp_path), route)  # type: ignore[arg-type]
    did = content_id(b"a delta")
    other = signer.sign(ticket(reflectors=("another",), deltas=frozenset({did.hex()})))
    assert fetcher.fetch_delta(did, 7, other) is None  # not for this reflector: not asked
    assert server.reports == [] and fetcher.usable() == [RID]
    mine = signer.sign(ticket(deltas=frozenset({did.hex()})))
    assert fetcher.fetch_delta(did, 7, mine) is None
    assert [r["problem"] for r in server.reports] == ["down"]
    assert fetcher.usable() == []  # not asked again in this update
    fetcher.close()

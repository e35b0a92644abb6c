"""Uploads that survive bad links, the parts that need no server: a bundle decoded as its
bytes arrive keeps every record that came whole, the HTTP layer hands a handler the body
that arrived before a disconnect, and the agent, after a broken upload, sends only the
chunks the server still lacks (issue 14, item 4). End to end: test_resume.py and
test_server_security.py."""

from __future__ import annotations

import asyncio
import logging
import random
import threading

import httpx
import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from strata.agent.client import ServerUnreachable
from strata.agent.sink import RemoteSink
from strata.errors import CorruptData
from strata.model.ids import content_id
from strata.model.transfer import BundleParser, BundleWriter, read_bundle
from strata.model.wire import ChunkerSpec
from strata.server.http_timeouts import BodyFirstCycle, TimedHttpProtocol


def records(n: int, seed: int = 1, size: int = 5_000) -> list[tuple[bytes, int, bytes]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        data = rng.randbytes(size)
        out.append((content_id(data), len(data), b"\x00" + data))
    return out


def bundle_of(recs: list[tuple[bytes, int, bytes]]) -> bytes:
    w = BundleWriter()
    for cid, n, payload in recs:
        w.add(cid, n, payload)
    return w.getvalue()


# -- the bundle, decoded as it arrives ---------------------------------------------------------


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_a_bundle_fed_in_pieces_of_any_size_gives_every_record_once_whole(piece):
    recs = records(6)
    body = bundle_of(recs)
    parser = BundleParser()
    got = []
    for i in range(0, len(body), piece):
        got += parser.feed(body[i:i + piece])
    parser.close()
    assert got == recs == list(read_bundle(body))


def test_a_cut_bundle_gives_the_records_before_the_cut_and_never_a_partial_one():
    recs = records(4)
    body = bundle_of(recs)
    record = len(body[8:]) // 4
    for cut in (8 + 2 * record + 1, 8 + 2 * record + 40, 8 + 3 * record - 1):
        parser = BundleParser()  # cut in the third record's header, then its payload
        assert parser.feed(body[:cut]) == recs[:2]
        with pytest.raises(CorruptData, match="truncated"):
            parser.close()
    parser = BundleParser()  # cut between two records: a whole bundle of two
    assert parser.feed(body[:8 + 2 * record]) == recs[:2]
    parser.close()


def test_garbage_is_refused_at_its_first_bytes_and_a_huge_record_at_its_header():
    with pytest.raises(CorruptData, match="bad magic"):
        BundleParser().feed(b"GARB")  # not even the whole magic yet
    parser = BundleParser()
    assert parser.feed(b"STRX") == []  # a magic still arriving is not refused
    with pytest.raises(CorruptData, match="bad magic"):
        parser.close()
    cid, _, payload = records(1)[0]
    huge = bundle_of([(cid, 300_000, payload)])[:8 + 40]  # the header only: 40 bytes
    with pytest.raises(CorruptData, match="larger than the largest chunk accepted"):
        BundleParser(max_raw=256 << 10).feed(huge)


def test_records_before_a_framing_error_in_the_same_piece_are_handed_on_first():
    recs = records(3)
    cid, _, payload = records(1, seed=2)[0]
    body = bundle_of(recs) + bundle_of([(cid, 300_000, payload)])[8:8 + 40]
    parser = BundleParser(max_raw=256 << 10)
    assert parser.feed(body) == recs  # in one piece with the oversized header after them
    for again in (lambda: parser.feed(b""), lambda: parser.feed(b"more"), parser.close):
        with pytest.raises(CorruptData, match="larger than the largest chunk accepted"):
            again()


def test_a_bundle_writer_subset_keeps_only_the_named_chunks_in_order():
    recs = records(5)
    w = BundleWriter()
    for r in recs:
        w.add(*r)
    rest = w.subset({recs[1][0], recs[4][0]})
    assert rest.count == 2 and rest.ids == [recs[1][0], recs[4][0]]
    assert list(read_bundle(rest.getvalue())) == [recs[1], recs[4]]
    assert rest.size == len(rest.getvalue())


# -- the HTTP layer: the body that arrived before a disconnect ---------------------------------


class _Transport:
    def is_closing(self) -> bool:
        return True


class _Flow:
    def resume_reading(self) -> None:
        pass


def _cycle(kind: type[RequestResponseCycle]) -> RequestResponseCycle:
    return kind(scope={"type": "http"}, transport=_Transport(), flow=_Flow(),  # type: ignore[arg-type]
                logger=logging.getLogger("t"), access_logger=logging.getLogger("t"),
                access_log=False, default_headers=[], message_event=asyncio.Event(),
                expect_100_continue=False, keep_alive=True, on_response=lambda: None)


def _receive_after_a_cut(kind: type[RequestResponseCycle]) -> list[dict]:
    async def scenario() -> list[dict]:
        cycle = _cycle(kind)
        cycle.body += b"the last 40 KiB that arrived"  # not yet read by the handler
        cycle.disconnected = True  # then the connection went
        cycle.message_event.set()
        return [dict(await cycle.receive()), dict(await cycle.receive())]
    return asyncio.run(scenario())


def test_a_handler_gets_the_body_that_arrived_before_the_disconnect():
    assert _receive_after_a_cut(BodyFirstCycle) == [
        {"type": "http.request", "body": b"the last 40 KiB that arrived", "more_body": True},
        {"type": "http.disconnect"}]
    # uvicorn's own cycle drops it: what BodyFirstCycle is for.
    assert _receive_after_a_cut(RequestResponseCycle)[0] == {"type": "http.disconnect"}
    # The server's protocol puts it in place where uvicorn starts a request's task.
    assert "_start_asgi_task" in vars(HttpToolsProtocol)
    assert "_start_asgi_task" in vars(TimedHttpProtocol)


# -- the agent: after a broken upload, only what the server still lacks -------------------------


class CuttingServer:
    """The upload side of the server: keeps the records of each bundle that arrive
    whole; `cuts` breaks the next uploads after that many body bytes."""

    def __init__(self, cuts: list[int]):
        self.cuts = cuts
        self.held: set[bytes] = set()
        self.bodies: list[bytes] = []
        self.retries = 5
        self.retried = 0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def request(self, method: str, path: str, *, json: object = None,
                content: bytes | None = None, retries: int | None = None) -> httpx.Response:
        req = httpx.Request(method, "http://server" + path)
        if path.endswith("/chunks/missing"):
            ids = json["ids"]  # type: ignore[index]
            lacking = [h for h in ids if bytes.fromhex(h) not in self.held]
            return httpx.Response(200, json={"missing": lacking, "prove": [], "nonce": ""},
                                  request=req)
        assert path.endswith("/chunks") and content is not None and retries == 0
        body = content[:self.cuts.pop(0)] if self.cuts else content
        self.bodies.append(body)
        parser = BundleParser()
        self.held.update(cid for cid, _, _ in parser.feed(body))
        if len(body) < len(content):
            raise ServerUnreachable("connection reset by peer")
        return httpx.Response(200, json={}, request=req)


def _sink(server: CuttingServer) -> RemoteSink:
    spec = ChunkerSpec(min_size=16 << 10, avg_size=64 << 10, max_size=256 << 10,
                       zstd_level=3)
    return RemoteSink(server, spec)  # type: ignore[arg-type]


def test_a_retried_upload_sends_only_the_chunks_the_server_did_not_keep():
    recs = records(10, size=20_000)
    w = BundleWriter()
    for r in recs:
        w.add(*r)
    record = len(w.getvalue()[8:]) // 10
    # Cut twice: inside the 4th chunk, then inside the 2nd chunk of what was left.
    server = CuttingServer(cuts=[8 + 3 * record + 100, 8 + record + 100])
    _sink(server)._upload(w)
    sent = [[cid for cid, _, _ in BundleParser().feed(body)] for body in server.bodies]
    ids = [r[0] for r in recs]
    assert sent == [ids[:3], ids[3:4], ids[4:]]  # whole records of each try
    assert server.held == set(ids)
    assert server.sleeps == [0.5, 1.0]
    # The bytes: the bundle once, plus the two chunks cut in flight.
    assert sum(map(len, server.bodies)) < len(w.getvalue()) + 2 * record + 3 * 8


def test_an_upload_that_keeps_failing_gives_up_after_the_clients_retries():
    w = BundleWriter()
    for r in records(3):
        w.add(*r)
    server = CuttingServer(cuts=[8] * 10)  # nothing past the magic gets through
    with pytest.raises(ServerUnreachable):
        _sink(server)._upload(w)
    assert server.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert len(server.bodies) == 6


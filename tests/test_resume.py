"""Layer downloads that survive bad links: a broken connection costs at most the chunk in
flight, an outage pauses the download instead of failing it, and a killed agent finds
what it had received (issue 14, item 4). Uploads likewise: the server keeps every chunk
of a cut bundle that arrived whole, and the next run sends only the rest."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from server_fixtures import (
    Agent,
    Server,
    centralized,
    kill_group,
    spawn,
    strata_json,
    wait_for,
)
from strata.agent.access import Access
from strata.agent.client import ServerUnreachable
from strata.agent.cycle import AgentContext, apply_now, run_cycle
from strata.agent.daemon import run_daemon
from strata.agent.resume import ChunkReceiver, DownloadPaused, fetch_chunks
from strata.agent.state import AgentState
from strata.agent.update import DOWNLOAD_JOURNAL
from strata.errors import CorruptData
from strata.model.ids import content_id
from strata.model.transfer import iter_bundle, pack_stream
from strata.store.repository import Store

MIB = 1 << 20


# -- the resume loop, against a flaky fake server ---------------------------------------------


class FlakyServer:
    """Serves chunk streams like the server; `cuts[i]` cuts the i-th answer after that many
    bytes, and `refusals` connection attempts fail outright first."""

    def __init__(self, chunks: dict[bytes, bytes], cuts: list[int | None], refusals: int = 0):
        self.chunks = chunks
        self.cuts = cuts
        self.refusals = refusals
        self.asked: list[list[bytes]] = []
        self.retries = 3
        self.retried = 0
        self.sleeps: list[float] = []
        self.bytes_received = 0
        self._lock = threading.Lock()

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    @contextlib.contextmanager
    def stream(self, method: str, path: str, json: dict, **_: object) -> Iterator[object]:
        if self.refusals:
            self.refusals -= 1
            raise ServerUnreachable("connection refused")
        ids = [bytes.fromhex(h) for h in json["ids"]]
        self.asked.append(ids)
        body = pack_stream([(c, self.chunks[c]) for c in ids], 1)
        cut = self.cuts.pop(0) if self.cuts else None
        yield CutBody(self, body, cut)


class CutBody:
    def __init__(self, server: FlakyServer, body: bytes, cut: int | None):
        self.server = server
        self.data = io.BytesIO(body if cut is None else body[:cut])
        self.cut = cut

    def read(self, n: int = -1) -> bytes:
        piece = self.data.read(min(n, 4096) if n >= 0 else 4096)
        self.server.bytes_received += len(piece)
        if not piece and self.cut is not None:
            raise ServerUnreachable("connection reset by peer")
        return piece


def random_chunks(n: int, size: int = 20_000, seed: int = 1) -> dict[bytes, bytes]:
    rng = random.Random(seed)
    datas = [rng.randbytes(size) for _ in range(n)]
    return {content_id(d): d for d in datas}


def test_broken_connections_resume_where_they_stopped_and_nothing_arrives_twice():
    chunks = random_chunks(40)
    ids = list(chunks)
    whole = len(pack_stream(list(chunks.items()), 1))
    server = FlakyServer(chunks, cuts=[whole // 3, whole // 4, None], refusals=0)
    kept: Counter[bytes] = Counter()
    fetch_chunks(server, "/chunks", ids, lambda cid, data: kept.update([cid]))  # type: ignore[arg-type]
    assert set(kept) == set(ids) and max(kept.values()) == 1
    # Each retry asks only for what had not arrived, in the original order.
    assert server.asked[0] == ids and len(server.asked) == 3
    assert set(ids) > set(server.asked[1]) > set(server.asked[2])
    for asked in server.asked[1:]:
        assert asked == ids[len(ids) - len(asked):]  # the rest, in the original order
    # What crossed the wire: the whole stream once, plus less than a chunk per cut.
    assert server.bytes_received <= whole + 2 * (20_000 + 64)
    assert server.sleeps == [0.5, 0.5]  # each try brought something: backoff starts over


def test_an_outage_backs_off_then_pauses_keeping_what_arrived():
    chunks = random_chunks(30)
    ids = list(chunks)
    whole = len(pack_stream(list(chunks.items()), 1))
    server = FlakyServer(chunks, cuts=[whole // 2])
    server.refusals = 0
    kept: list[bytes] = []

    def cut_then_down(cid: bytes, data: bytes) -> None:
        kept.append(cid)
        server.refusals = 100  # the link goes down after the cut and stays down

    with pytest.raises(DownloadPaused, match="paused with .* of 30 chunks"):
        fetch_chunks(server, "/chunks", ids, cut_then_down)  # type: ignore[arg-type]
    assert 0 < len(kept) < len(ids)
    assert server.sleeps == [0.5, 1.0, 2.0]  # retries fruitless tries, growing waits
    assert isinstance(DownloadPaused("x"), ServerUnreachable)  # the cycle exits 3 on it

    server.refusals = 0  # back: the next try asks for the rest only
    rest = [c for c in ids if c not in kept]
    fetch_chunks(server, "/chunks", rest, lambda cid, data: kept.append(cid))  # type: ignore[arg-type]
    assert sorted(kept) == sorted(ids)


def test_a_busy_server_is_asked_again_after_the_wait_it_names():
    chunks = random_chunks(5)

    class Busy(FlakyServer):
        busy = 2

        @contextlib.contextmanager
        def stream(self, method: str, path: str, json: dict, **kw: object) -> Iterator[object]:
            if self.busy:
                self.busy -= 1
                raise ServerUnreachable("server busy (429)", retry_after=20.0)
            with super().stream(method, path, json, **kw) as body:
                yield body

    server = Busy(chunks, cuts=[])
    kept: list[bytes] = []
    assert fetch_chunks(server, "/chunks", list(chunks), lambda c, d: kept.append(c)) == []  # type: ignore[arg-type]
    assert server.sleeps == [20.0, 20.0] and sorted(kept) == sorted(chunks)


def test_a_killed_download_leaves_its_chunks_in_the_journal(tmp_path):
    Store.init(tmp_path / "cache", compression="zstd:3").close()
    chunks = random_chunks(12)
    ids = list(chunks)
    cache = Store.open(tmp_path / "cache")
    receiver = ChunkReceiver(cache, tmp_path / "journal")
    for cid in ids[:8]:
        receiver.keep(cid, chunks[cid])
    # Killed here: the cache's pack was never finished, and the last write was torn.
    assert receiver._fd is not None
    os.close(receiver._fd)
    with open(tmp_path / "journal", "ab") as f:
        f.write(b"\x01" * 50)
    cache.close()
    shutil.rmtree(tmp_path / "cache" / "tmp", ignore_errors=True)
    # A damaged record is dropped, not trusted: its chunk is downloaded again.
    journal = bytearray((tmp_path / "journal").read_bytes())
    journal[-60] ^= 0xFF  # inside the last whole record's payload
    (tmp_path / "journal").write_bytes(bytes(journal))

    cache = Store.open(tmp_path / "cache")
    try:
        assert sorted(cache.missing_chunks(ids)) == sorted(ids)
        receiver = ChunkReceiver(cache, tmp_path / "journal")
        assert receiver.recovered == 7
        assert not (tmp_path / "journal").exists()
        assert sorted(cache.missing_chunks(ids)) == sorted(ids[7:])
        assert all(cache.load_chunk(c) == chunks[c] for c in ids[:7])
    finally:
        cache.close()


# -- end to end: a real server behind a proxy that cuts the link ------------------------------

CHUNKS_PATH = b"/api/v1/agent/layers/chunks"
UPLOAD_PATH = b"/api/v1/agent/chunks"
MISSING_PATH = b"/api/v1/agent/chunks/missing"


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


class LinkProxy:
    """A TCP proxy on loopback between an agent and the server. It records the ids of
    every chunk request and counts the bytes of their answers; armed with `cut_after`, it
    breaks the link once that many answer bytes have passed: the link then goes down
    (connections refused until `up()`), or with `stall` it stops forwarding and holds on.
    Uploads likewise: it keeps the body of each (`uploads`, as far as it was forwarded)
    and the ids each "missing?" asked about, and counts upload body bytes; armed with
    `cut_upload_after`, it forwards that many and no more, and the link goes down."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.requested: list[list[bytes]] = []
        self.answer_bytes = 0
        self.cut_after: int | None = None
        self.asked: list[list[bytes]] = []  # the ids of each "missing?" query
        self.uploads: list[bytearray] = []  # each upload's body, as far as it went
        self.upload_bytes = 0
        self.cut_upload_after: int | None = None
        self.stall = False
        self.down = False
        self.released = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def up(self) -> None:
        with self.lock:
            self.down, self.cut_after, self.cut_upload_after = False, None, None
            self.released.set()
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.up()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                conn.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.upstream))
            with self.lock:
                self.sockets += [conn, server]
            current = {"path": b""}
            threading.Thread(target=self._requests, args=(conn, server, current),
                             daemon=True).start()
            threading.Thread(target=self._answers, args=(server, conn, current),
                             daemon=True).start()

    def _requests(self, src: socket.socket, dst: socket.socket, current: dict) -> None:
        header = b""  # a request's header, until it is whole
        body_left = 0  # bytes still to come of the current request's body
        body = bytearray()
        cut = False
        with contextlib.suppress(OSError):
            while not cut and (data := src.recv(65536)):
                out = bytearray()
                while data and not cut:
                    if not body_left:
                        header += data
                        if b"\r\n\r\n" not in header:
                            break
                        head, data = header.split(b"\r\n\r\n", 1)
                        header = b""
                        out += head + b"\r\n\r\n"
                        current["path"] = head.split(b" ")[1]
                        body_left = _content_length(head)
                        body = bytearray()
                        if current["path"] == UPLOAD_PATH:
                            with self.lock:
                                self.uploads.append(body)
                        if not body_left:
                            self._request_done(current["path"], body)
                        continue
                    piece, data = data[:body_left], data[body_left:]
                    if current["path"] == UPLOAD_PATH:
                        with self.lock:
                            limit = self.cut_upload_after
                            if limit is not None and self.upload_bytes + len(piece) > limit:
                                piece, cut = piece[:limit - self.upload_bytes], True
                            self.upload_bytes += len(piece)
                    out += piece
                    body += piece
                    body_left -= len(piece)
                    if not body_left:
                        self._request_done(current["path"], body)
                dst.sendall(out)
        if cut:  # the link goes down: both ends see the connection close
            self.down = True
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            return
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _request_done(self, path: bytes, body: bytearray) -> None:
        """Note the chunk ids of a whole request: a chunk download's, a "missing?"."""
        if path in (CHUNKS_PATH, MISSING_PATH):
            ids = [bytes.fromhex(h) for h in json.loads(body)["ids"]]
            with self.lock:
                (self.requested if path == CHUNKS_PATH else self.asked).append(ids)

    def _answers(self, src: socket.socket, dst: socket.socket, current: dict) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if current["path"] == CHUNKS_PATH:
                    with self.lock:
                        if self.cut_after is not None and \
                                self.answer_bytes + len(data) > self.cut_after:
                            data = data[:self.cut_after - self.answer_bytes]
                            cut = True
                        else:
                            cut = False
                        self.answer_bytes += len(data)
                    if cut:
                        dst.sendall(data)
                        if self.stall:
                            self.released.wait(120)
                        else:
                            self.down = True
                        break
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture
def world(tmp_path):
    server = Server(tmp_path / "server").start()
    proxy = LinkProxy(server.port)
    try:
        yield server, proxy
    finally:
        proxy.close()
        server.stop()
        server.kill()


LAYER_BYTES = 6 * MIB


def endpoint_with_assigned_layer(server: Server, proxy: LinkProxy, base: Path) -> Agent:
    """An endpoint enrolled through the proxy, centralized, with a 6 MiB base layer of
    incompressible files assigned (none of it on the endpoint yet)."""
    rng = random.Random(5)
    layer = base / "layer"
    for i in range(6):
        p = layer / f"usr/lib/big{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(LAYER_BYTES // 6))
    root = base / "endpoint"
    (root / "home/ann").mkdir(parents=True)
    (root / "home/ann/notes.txt").write_text("mine\n")
    agent = Agent(server, root, base / "state")
    strata_json("agent", "enroll", "--server", proxy.url, "--token", server.create_token(),
                "--root", root, "--state", agent.state)
    centralized(agent.run_once())
    server.admin_cli("layer", "capture", "--kind", "base", "--name", "os", "--version", "1",
                     "--from-dir", layer)
    server.admin_cli("assign", "--all", "--base", "os:1")
    return agent


def cached(agent: Agent, ids: set[bytes]) -> set[bytes]:
    cache = Store.open(agent.state / "cache")
    try:
        return ids - set(cache.missing_chunks(sorted(ids)))
    finally:
        cache.close()


@pytest.mark.e2e
def test_an_outage_mid_download_pauses_it_and_the_next_run_resumes(world, tmp_path):
    server, proxy = world
    agent = endpoint_with_assigned_layer(server, proxy, tmp_path)
    waits: list[float] = []
    ctx = AgentContext.load(AgentState(agent.state), sleep=waits.append)
    proxy.cut_after = LAYER_BYTES // 2  # then the link stays down

    first = run_cycle(ctx)
    assert first.exit_code == 3, first.to_dict()  # unreachable, as `run --once` says
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0]  # backed off, without waiting it out here
    saved = json.loads((agent.state / "update.json").read_text())
    assert saved["state"] == "downloading" and "paused" in saved["paused"], saved
    all_ids = {c for req in proxy.requested for c in req}
    kept = cached(agent, all_ids)
    assert LAYER_BYTES // 3 // 65536 < len(kept) < len(all_ids)
    first_bytes = proxy.answer_bytes

    proxy.up()
    second = run_cycle(ctx)
    assert second.update is not None and second.update.state == "ready", second.to_dict()
    resumed = [c for req in proxy.requested[1:] for c in req]
    assert not set(resumed) & kept  # nothing received is asked for again
    assert set(resumed) == all_ids - kept
    assert cached(agent, all_ids) == all_ids
    # What the chunk answers carried in all: the layer once, plus the chunk in flight at
    # the cut and the framing (random data does not compress).
    assert proxy.answer_bytes <= LAYER_BYTES + 300 * 1024, (first_bytes, proxy.answer_bytes)
    assert agent.run_once()["update"]["state"] == "ready"  # not failed, then or since


@pytest.mark.e2e
def test_a_killed_agent_resumes_its_download_without_fetching_a_chunk_twice(world, tmp_path):
    server, proxy = world
    agent = endpoint_with_assigned_layer(server, proxy, tmp_path)
    proxy.stall, proxy.cut_after = True, LAYER_BYTES // 2
    run = spawn(*agent.cmd("run", "--once", "--json"))
    journal = agent.state / DOWNLOAD_JOURNAL
    deadline = time.monotonic() + 120
    while not (journal.exists() and journal.stat().st_size > LAYER_BYTES // 2 - 512 * 1024):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.05)
    kill_group(run)  # SIGKILL mid-batch: the cache's pack was never finished
    received = proxy.answer_bytes
    proxy.up()

    out = agent.run_once()
    assert out["update"]["state"] == "ready", out
    first, rest = proxy.requested[0], [c for req in proxy.requested[1:] for c in req]
    assert len(rest) < len(first) * 0.6  # about half was kept through the kill
    assert len(set(rest)) == len(rest) and set(rest) < set(first)
    assert proxy.answer_bytes <= LAYER_BYTES + 600 * 1024, (received, proxy.answer_bytes)
    assert not (agent.state / DOWNLOAD_JOURNAL).exists()
    assert os.path.getsize(agent.state / "update.json") > 0


@pytest.mark.e2e
def test_an_outage_during_apply_leaves_it_to_carry_on_not_failed(world, tmp_path):
    server, proxy = world
    agent = endpoint_with_assigned_layer(server, proxy, tmp_path)
    waits: list[float] = []
    ctx = AgentContext.load(AgentState(agent.state), sleep=waits.append)
    assert agent.run_once()["update"]["state"] == "ready"
    # The cache lost (a disk cleaned up): the apply must fetch the layer again, and the
    # link breaks half-way through that.
    shutil.rmtree(agent.state / "cache")
    proxy.requested.clear()
    proxy.cut_after = proxy.answer_bytes + LAYER_BYTES // 2
    with pytest.raises(ServerUnreachable):
        apply_now(ctx)
    saved = json.loads((agent.state / "update.json").read_text())
    assert saved["state"] == "applying" and saved["pre_update_snapshot"], saved
    assert "paused" in saved["paused"]
    all_ids = set(proxy.requested[0])
    kept = cached(agent, all_ids)
    assert 0 < len(kept) < len(all_ids)

    proxy.up()
    outcome = apply_now(ctx)
    assert outcome.update is not None and outcome.update.state == "applied"
    assert outcome.update.pre_update_snapshot == saved["pre_update_snapshot"]  # not retaken
    resumed = {c for req in proxy.requested[1:] for c in req}
    assert resumed == all_ids - kept
    assert (agent.root / "usr/lib/big0.bin").stat().st_size == LAYER_BYTES // 6


@pytest.mark.e2e
def test_the_daemon_keeps_running_through_an_outage_and_finishes_the_download(world,
                                                                              tmp_path):
    server, proxy = world
    agent = endpoint_with_assigned_layer(server, proxy, tmp_path)
    ctx = AgentContext.load(AgentState(agent.state), sleep=lambda s: None)
    proxy.cut_after = LAYER_BYTES // 2
    daemon_waits: list[float] = []

    def between_cycles(seconds: float) -> None:
        daemon_waits.append(seconds)
        proxy.up()  # the link comes back while the daemon waits

    def failed(exc: Exception) -> None:
        raise AssertionError(f"a cycle raised: {exc}")

    results: list = []
    run_daemon(ctx, poll=60, on_cycle=results.append, on_error=failed,
               sleep=between_cycles, max_cycles=2)
    assert [r.access for r in results] == [Access.UNREACHABLE, Access.OK], results
    assert "download paused" in results[0].message
    assert daemon_waits == [120.0]  # an offline cycle: the wait grows from the poll
    assert results[1].update is not None and results[1].update.state == "ready"
    first, rest = proxy.requested[0], [c for req in proxy.requested[1:] for c in req]
    assert len(rest) < len(first) and set(rest) < set(first)


# -- uploads: an outage mid-bundle costs the chunk in flight, not the bundle -----------------


def whole_records(body: bytes | bytearray) -> list[bytes]:
    """The ids of the records of a bundle that arrived whole (a cut body: the last is
    cut short)."""
    ids = []
    with contextlib.suppress(CorruptData):
        for cid, _, _ in iter_bundle(io.BytesIO(bytes(body))):
            ids.append(cid)
    return ids


TREE_BYTES = 6 * MIB


@pytest.mark.e2e
def test_an_outage_mid_upload_keeps_what_arrived_and_the_next_run_sends_only_the_rest(
        world, tmp_path):
    server, proxy = world
    rng = random.Random(7)
    root = tmp_path / "endpoint"
    for i in range(6):  # incompressible: the bundle's bytes are the tree's
        p = root / f"home/ann/big{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(TREE_BYTES // 6))
    state = tmp_path / "state"
    strata_json("agent", "enroll", "--server", proxy.url, "--token", server.create_token(),
                "--root", root, "--state", state)
    waits: list[float] = []
    ctx = AgentContext.load(AgentState(state), sleep=waits.append)
    kept_before = server.metric("strata_upload_chunks_kept_total")
    proxy.cut_upload_after = TREE_BYTES // 2  # mid-bundle (one bundle: up to 8 MiB)

    first = run_cycle(ctx)
    assert first.exit_code == 3, first.to_dict()  # unreachable: retried, then given up
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert len(proxy.uploads) == 1 and len(proxy.uploads[0]) == TREE_BYTES // 2
    wanted = {c for ids in proxy.asked for c in ids}  # every chunk the server lacked
    arrived = whole_records(proxy.uploads[0])
    assert len(arrived) > 20 and set(arrived) < wanted
    # The server keeps exactly the chunks that arrived whole (a moment after the cut).
    assert wait_for(lambda: server.metric("strata_upload_chunks_kept_total")
                    >= kept_before + len(arrived), 30)
    assert server.metric("strata_upload_chunks_kept_total") == kept_before + len(arrived)
    first_bytes = proxy.upload_bytes

    proxy.up()
    second = run_cycle(ctx)
    assert second.exit_code == 0 and second.centralization is not None, second.to_dict()
    resent = [c for body in proxy.uploads[1:] for c in whole_records(body)]
    assert len(resent) == len(set(resent))
    assert not set(resent) & set(arrived)  # nothing that arrived whole is sent again
    assert set(resent) >= wanted - set(arrived)  # the rest, the chunk cut in two among it
    # and the snapshot's manifest, which the first run did not reach (asked last)
    assert set(resent) - wanted == set(proxy.asked[-1])
    resent_bytes = proxy.upload_bytes - first_bytes
    print(f"\ncut after {first_bytes:,} B ({len(arrived)} chunks whole); the next run sent "
          f"{resent_bytes:,} B ({len(resent)} chunks) for a {TREE_BYTES:,} B tree; "
          f"{first_bytes + resent_bytes:,} B in all")
    # The tree once, plus the chunk in flight at the cut (at most 256 KiB) and framing;
    # the old server kept nothing of a cut bundle: the next run sent it whole again.
    assert first_bytes + resent_bytes <= TREE_BYTES + 300 * 1024

"""The branch reflector end to end on loopback: a server, a reflector (`strata reflector
run`) and three agents. One base update reaches every agent through the reflector and
each chunk crosses the "WAN" (server -> reflector) once; agents finish through the server
when the reflector dies; a reflector that serves a bad chunk is caught and quarantined;
tickets let an endpoint read only its own layers and snapshots (forged, expired, other
endpoints' snapshots, unassigned layers); a layer exported offline seeds a reflector; a
file restore reads through the reflector, and through the server when it is down; file
and manifest deltas cross the WAN once for two agents, delta tickets read only what the
server offered, and a reflector serving a bad delta is caught."""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

import web
from server_fixtures import (
    Agent,
    Server,
    centralized,
    free_port,
    kill_group,
    run_all,
    spawn,
    strata,
    strata_json,
)
from strata.model.tickets import Ticket, TicketSigner
from strata.model.transfer import pack_stream, read_stream

pytestmark = pytest.mark.e2e

MIB = 1 << 20
AGENTS = 3


def make_layer(path: Path, seed: int, size: int = 3 * MIB) -> None:
    rng = random.Random(seed)
    for i in range(6):
        p = path / f"usr/lib/part{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(size // 6))
    (path / "etc").mkdir(parents=True, exist_ok=True)
    (path / "etc/os-release").write_text(f"NAME=test {seed}\n")


def wait_for(predicate, timeout: float = 60, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


class Reflector:
    """One `strata reflector` host: its state, cache, listen port and process."""

    def __init__(self, server: Server, base: Path, name: str):
        self.server, self.name = server, name
        self.state, self.cache = base / f"{name}.state", base / f"{name}.cache"
        self.port = free_port()
        self.proc: subprocess.Popen[str] | None = None

    def enroll(self) -> str:
        token = strata_json("token", "create", "--reflector", "--server", self.server.url,
                            "--admin-token-file", self.server.token_file)["token"]  # type: ignore[index]
        token_file = self.state.parent / f"{self.name}.token"
        token_file.write_text(token + "\n")
        doc = strata_json("reflector", "enroll", "--server", self.server.url, "--token-file",
                          token_file, "--listen", f"127.0.0.1:{self.port}", "--cache",
                          self.cache, "--cache-size", "256MiB", "--state", self.state,
                          "--name", self.name)
        self.id = doc["reflector_id"]  # type: ignore[index]
        return self.id

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, poll: float = 1.0) -> None:
        self.proc = spawn("reflector", "run", "--state", self.state, "--poll", poll)
        wait_for(self.alive, 60, "the reflector to answer")

    def alive(self) -> bool:
        try:
            return web.get(self.url + "/api/v1/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def kill(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)

    def status(self) -> dict:
        return strata_json("reflector", "status", "--state", self.state)  # type: ignore[return-value]

    def counters(self) -> dict:
        """The counters the running reflector saved last (every 2 s), without a CLI run."""
        try:
            return json.loads((self.state / "counters.json").read_text())
        except (OSError, ValueError):
            return {}


def info(server: Server, rid: str) -> dict:
    return server.admin("GET", f"/reflectors/{rid}")  # type: ignore[return-value]


@pytest.fixture(scope="module")
def branch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    base = tmp_path_factory.mktemp("branch")
    server = Server(base / "server").start()
    refl = Reflector(server, base, "lyon")
    try:
        agents = []
        for i in range(AGENTS):
            root = base / f"endpoint{i}"
            (root / "home/ann").mkdir(parents=True)
            (root / "home/ann/notes.txt").write_text(f"endpoint {i}'s own notes\n")
            agent = Agent(server, root, base / f"agent{i}.state")
            agent.enroll(server.create_token())
            agents.append(agent)
        for out in run_all([a.cmd("run", "--once") for a in agents]):
            centralized(out)  # type: ignore[arg-type]
        refl.enroll()
        rules = base / "reflectors.json"
        rules.write_text(json.dumps({"rules": [{"subnet": "127.0.0.0/8",
                                                "reflectors": [refl.id]}]}))
        server.admin_cli("policy", "set", "reflectors", rules, "--replace", "--yes")
        # A poll far apart: these downloads are driven by the agents (single flight);
        # warm-up has its own test.
        refl.start(poll=3600)
        yield SimpleNamespace(server=server, agents=agents, refl=refl, base=base)
    finally:
        refl.kill()
        server.stop()
        server.kill()


def capture(world: SimpleNamespace, version: int, size: int = 3 * MIB) -> Path:
    layer = world.base / f"layer{version}"
    make_layer(layer, version, size)
    world.server.admin_cli("layer", "capture", "--kind", "base", "--name", "os", "--version",
                           version, "--from-dir", layer)
    return layer


def layer_snapshot(world: SimpleNamespace, version: int) -> str:
    return world.server.admin("GET", f"/layers/os:{version}")["snapshot"]  # type: ignore[index]


def ready(out: dict) -> dict:
    assert out.get("checked_in"), out
    assert out["update"]["state"] == "ready", out
    return out["update"]


def test_one_update_reaches_every_agent_through_the_reflector_each_chunk_crossing_once(
        branch):
    world = branch
    capture(world, 1)
    world.server.admin_cli("assign", "--all", "--base", "os:1")
    before = info(world.server, world.refl.id)
    outs = run_all([a.cmd("run", "--once") for a in world.agents])  # side by side
    updates = [ready(o) for o in outs]  # type: ignore[arg-type]
    for u in updates:
        assert u["reflector"]["chunks_from_reflector"] > 0, u
        assert not u["reflector"]["reflector_failures"], u
    after = info(world.server, world.refl.id)
    # Every data chunk of the layer, each fetched from the server once, however many
    # agents asked for it at the same moment.
    wanted = len(_layer_chunk_ids(world, 1))
    assert all(u["reflector"]["chunks_from_reflector"] == wanted for u in updates), updates
    fetched = after["chunks_from_server"] - before["chunks_from_server"]
    assert fetched == wanted, (fetched, wanted)
    # What crossed the WAN: about one endpoint's download, not three.
    wan = after["bytes_from_server"] - before["bytes_from_server"]
    assert 2.5 * MIB < wan < 3.5 * MIB, wan
    # What `strata reflector status --json` shows (the counters are saved every 2 s).
    wait_for(lambda: world.refl.counters().get("misses", 0) > 0, 30, "the counters")
    status = world.refl.status()
    assert status["status"] == "active" and status["reflector_id"] == world.refl.id
    assert status["cache_bytes"] > 2.5 * MIB and status["misses"] > 0, status
    applied = strata_json(*world.agents[0].cmd("apply"))
    assert applied["state"] == "applied", applied  # type: ignore[index]
    assert (world.agents[0].root / "usr/lib/part0.bin").read_bytes() == \
        (world.base / "layer1/usr/lib/part0.bin").read_bytes()


def _ticket_of(agent: Agent) -> dict:
    return json.loads((agent.state / "reflector.json").read_text())


def _ask(world: SimpleNamespace, ticket: str, ids: list[bytes], path: str = "layers/chunks"
         ) -> httpx.Response:
    return web.post(f"{world.refl.url}/api/v1/agent/{path}", timeout=30,
                    headers={"Authorization": f"Bearer {ticket}"},
                    json={"ids": [c.hex() for c in ids]})


def test_tickets_let_an_endpoint_read_only_its_own_layers_and_snapshots(branch):
    world = branch
    a, b = world.agents[0], world.agents[1]
    route = _ticket_of(a)
    ticket = route["ticket"]
    # The agent's own ticket reads chunks of its assigned layer (the cache has them).
    store_ids = _layer_chunk_ids(world, 1)
    resp = _ask(world, ticket, store_ids[:2])
    assert resp.status_code == 200, resp.text
    assert [cid for cid, _, _ in read_stream(resp.content)] == store_ids[:2]

    # Forged: signed by another key.
    forged_key = TicketSigner(world.base / "forged.key")
    parsed = json.loads(base64.urlsafe_b64decode(ticket.split(".")[0] + "=="))
    mine = Ticket(parsed["e"], tuple(parsed["r"]), frozenset(parsed["s"]), True,
                  int(time.time()), int(time.time()) + 3600)
    assert _ask(world, forged_key.sign(mine), store_ids[:1]).status_code == 403
    # Tampered: the payload changed under the server's signature (another endpoint).
    body, sig = ticket.split(".")
    other = base64.urlsafe_b64encode(json.dumps({**parsed, "e": b.endpoint_id}).encode()
                                     ).rstrip(b"=").decode()
    assert _ask(world, f"{other}.{sig}", store_ids[:1]).status_code == 403
    # Expired, though the server's own key signed it.
    server_key = TicketSigner(world.server.data / "reflector-tickets.key")
    old = Ticket(a.endpoint_id, (world.refl.id,), frozenset(parsed["s"]), True,
                 int(time.time()) - 7200, int(time.time()) - 3600)
    resp = _ask(world, server_key.sign(old), store_ids[:1])
    assert resp.status_code == 403 and "expired" in resp.text, resp.text
    # For another reflector.
    elsewhere = Ticket(a.endpoint_id, ("00000000-0000-0000-0000-000000000000",),
                       frozenset(parsed["s"]), True, int(time.time()), int(time.time()) + 60)
    assert _ask(world, server_key.sign(elsewhere), store_ids[:1]).status_code == 403
    # No ticket at all.
    assert web.post(f"{world.refl.url}/api/v1/agent/layers/chunks", json={"ids": []},
                    timeout=10).status_code == 401

    # A layer that is not assigned to this endpoint: captured, never assigned.
    capture(world, 9, size=MIB)
    unassigned = _layer_chunk_ids(world, 9)
    resp = _ask(world, ticket, unassigned[:1])
    assert resp.status_code == 403, resp.text
    # Another endpoint's snapshot, named with this endpoint's ticket: refused, whether
    # the reflector has seen that snapshot or not.
    theirs = b.snapshots()[-1]["id"]
    resp = _ask(world, ticket, [], path=f"snapshots/{theirs}/chunks")
    assert resp.status_code in (403, 404), resp.text
    # ... while this endpoint's own snapshot reads (a file restore through the reflector).
    own = a.snapshots()[-1]["id"]
    resp = _ask(world, ticket, [], path=f"snapshots/{own}/chunks")
    assert resp.status_code == 200, resp.text

    # The reflector's own credential buys nothing beyond a ticket at the server either.
    cred = json.loads((world.refl.state / "reflector.json").read_text())["credential"]
    resp = web.post(world.server.url + "/api/v1/reflector/chunks", timeout=30,
                    headers={"Authorization": f"Bearer {cred}"},
                    json={"ids": [unassigned[0].hex()], "ticket": ticket})
    assert resp.status_code == 403, resp.text
    resp = web.post(world.server.url + f"/api/v1/reflector/snapshots/{theirs}/chunk-ids",
                    timeout=30, headers={"Authorization": f"Bearer {cred}"},
                    json={"ticket": ticket})
    assert resp.status_code in (403, 404), resp.text
    resp = web.get(world.server.url + f"/api/v1/agent/snapshots/{theirs}/manifest",
                   timeout=30, headers={"Authorization": f"Bearer {cred}"})
    assert resp.status_code == 401, resp.text  # not a device credential


def _layer_chunk_ids(world: SimpleNamespace, version: int) -> list[bytes]:
    """The data chunks of layer os:VERSION in tree order, read from the server's store."""
    from strata.store.repository import Store

    sid = layer_snapshot(world, version)
    store = Store.open(world.server.store)
    try:
        snap = store.load_snapshot(sid)
        return list(dict.fromkeys(c for e in store.iter_manifest(snap) for c, _ in e.chunks))
    finally:
        store.close()


def test_agents_finish_through_the_server_when_the_reflector_dies(branch):
    world = branch
    capture(world, 2)
    world.server.admin_cli("assign", "--all", "--base", "os:2")
    first = ready(world.agents[0].run_once())
    assert first["reflector"]["chunks_from_reflector"] > 0
    before = info(world.server, world.refl.id)["fallbacks"]
    world.refl.kill()  # half-way: one agent has its update, two do not
    try:
        for agent in world.agents[1:]:
            update = ready(agent.run_once())
            assert update["reflector"]["chunks_from_reflector"] == 0, update
            assert list(update["reflector"]["reflector_failures"].values())[0].startswith(
                "down"), update
        assert info(world.server, world.refl.id)["fallbacks"] == before + AGENTS - 1
    finally:
        world.refl.start(poll=3600)


class BadReflector:
    """A reflector that flips a byte in every chunk it serves, and serves garbage for any
    delta (in-process, loopback)."""

    def __init__(self, chunks: dict[bytes, bytes]):
        import http.server

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                ids = [bytes.fromhex(h) for h in json.loads(self.rfile.read(
                    int(self.headers["Content-Length"])))["ids"]]
                outer.asked += len(ids)
                body = pack_stream([(c, b"\xff" + outer.chunks[c][1:]) for c in ids], 3)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                outer.deltas += 1  # a delta's body: garbage of some other length
                body = random.Random(outer.deltas).randbytes(100)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.chunks, self.asked, self.deltas = chunks, 0, 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


def test_a_reflector_that_serves_a_bad_chunk_is_caught_and_quarantined(branch):
    world = branch
    capture(world, 3, size=MIB)
    chunks = {cid: _chunk(world, cid) for cid in _layer_chunk_ids(world, 3)}
    bad = BadReflector(chunks)
    try:
        token = world.server.admin("POST", "/tokens", {"uses": 1, "purpose": "reflector"}
                                   )["token"]
        resp = web.post(world.server.url + "/api/v1/reflector/enroll", timeout=30, json={
            "token": token, "name": "evil", "url": bad.url})
        assert resp.status_code == 200, resp.text
        evil = resp.json()["reflector_id"]
        rules = world.base / "evil.json"
        rules.write_text(json.dumps({"rules": [{"subnet": "127.0.0.0/8",
                                                "reflectors": [evil]}]}))
        world.server.admin_cli("policy", "set", "reflectors", rules, "--replace", "--yes")
        world.server.admin_cli("assign", "--endpoint", world.agents[0].endpoint_id,
                               "--base", "os:3")
        update = ready(world.agents[0].run_once())
        assert bad.asked > 0
        assert list(update["reflector"]["reflector_failures"].values())[0].startswith(
            "corrupt"), update
        listed = {r["id"]: r for r in strata_json(
            "reflector", "list", "--server", world.server.url, "--admin-token-file",
            world.server.token_file)}  # type: ignore[union-attr]
        assert listed[evil]["status"] == "quarantined", listed[evil]
        assert listed[evil]["bad_chunks"] == 1
        # Out of rotation: the next check-in names no reflector at all.
        world.agents[0].run_once()
        assert not (world.agents[0].state / "reflector.json").exists()
    finally:
        bad.close()
        rules = world.base / "good.json"
        rules.write_text(json.dumps({"rules": [{"subnet": "127.0.0.0/8",
                                                "reflectors": [world.refl.id]}]}))
        world.server.admin_cli("policy", "set", "reflectors", rules, "--replace", "--yes")


def _chunk(world: SimpleNamespace, cid: bytes) -> bytes:
    from strata.store.repository import Store

    store = Store.open(world.server.store)
    try:
        return store.load_chunk(cid)
    finally:
        store.close()


def test_warm_up_fetches_an_assigned_layer_before_the_agents_ask(branch):
    world = branch
    # The agents' next check-in routes them to the reflector again.
    run_all([a.cmd("run", "--once") for a in world.agents])
    capture(world, 4)
    world.server.admin_cli("assign", "--all", "--base", "os:4")
    before = info(world.server, world.refl.id)["chunks_from_server"]
    out = strata_json("reflector", "warm", "os:4", "--state", world.refl.state)
    assert out["bytes_from_server"] > 2 * MIB, out  # type: ignore[index]
    warmed = info(world.server, world.refl.id)["chunks_from_server"] - before
    for update in (ready(o) for o in run_all([a.cmd("run", "--once")  # type: ignore[arg-type]
                                              for a in world.agents])):
        assert update["reflector"]["chunks_from_reflector"] > 0, update
    # Nothing more crossed the WAN: the agents were served from the cache.
    assert info(world.server, world.refl.id)["chunks_from_server"] - before == warmed


def test_a_layer_exported_offline_seeds_a_reflector_and_bad_bytes_are_refused(branch):
    world = branch
    bundle = world.base / "os1.strata"
    world.server.admin_cli("layer", "export", "os:1", bundle)
    seeded = Reflector(world.server, world.base, "annecy")
    seeded.enroll()
    out = strata_json("reflector", "import", bundle, "--state", seeded.state)
    assert out["chunks"] >= len(_layer_chunk_ids(world, 1)), out  # type: ignore[index]
    assert out["bad_chunks"] == 0 and out["bytes_added"] > 2 * MIB, out  # type: ignore[index]
    assert seeded.status()["cache_bytes"] > 2 * MIB
    # One byte changed in the file: that chunk fails its id and is not kept.
    raw = bytearray(bundle.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bundle.write_bytes(bytes(raw))
    again = Reflector(world.server, world.base, "chambery")
    again.enroll()
    proc = strata("reflector", "import", bundle, "--state", again.state, "--json", rc=1)
    doc = json.loads(proc.stdout)
    assert doc["bad_chunks"] == 1, doc


def test_retiring_a_reflector_asks_first_and_its_credential_stops_working(branch):
    world = branch
    refl = Reflector(world.server, world.base, "grenoble")
    refl.enroll()
    admin = ("--server", world.server.url, "--admin-token-file", world.server.token_file)
    refused = strata("reflector", "retire", refl.id, *admin, rc=2)  # no terminal, no --yes
    assert "refusing without --yes" in refused.stderr and refused.stderr.count("\n") == 1
    assert info(world.server, refl.id)["status"] == "active"
    done = strata_json("reflector", "retire", refl.id, "--yes", *admin)
    assert done["status"] == "retired"  # type: ignore[index]
    cred = json.loads((refl.state / "reflector.json").read_text())["credential"]
    resp = web.post(world.server.url + "/api/v1/reflector/poll", json={}, timeout=30,
                    headers={"Authorization": f"Bearer {cred}"})
    assert resp.status_code == 401 and "retired" in resp.text, resp.text
    again = strata("reflector", "reinstate", refl.id, *admin, rc=2)
    assert "enroll it again" in again.stderr
    shown = strata("reflector", "show", refl.id[:8], *admin).stdout
    assert "status: retired" in shown, shown


def test_the_reflectors_fetches_follow_the_bandwidth_rules_of_its_site(branch):
    """The WAN is what a branch's caps protect: a reflector warming a layer is capped like
    an agent, by the rule for its site (or subnet), at the rate the rule names."""
    world = branch
    run_all([a.cmd("run", "--once") for a in world.agents])  # routed to the reflector again
    capture(world, 7, size=2 * MIB)  # random bytes: the stream does not compress them
    world.server.admin_cli("assign", "--all", "--base", "os:7")
    rules = world.base / "bandwidth.json"
    rules.write_text(json.dumps({"rules": [{"site": "lyon", "download_kbps": 4000}]}))
    world.server.admin_cli("policy", "set", "bandwidth", rules, "--replace", "--yes")
    try:
        (world.refl.state / "site").write_text("lyon\n")  # as `reflector enroll --site lyon`
        out = strata_json("reflector", "warm", "os:7", "--state", world.refl.state)
    finally:
        (world.refl.state / "site").unlink()
        world.server.admin_cli("policy", "reset", "bandwidth", "--yes")
    assert out["bandwidth"]["download_kbps"] == 4000, out  # type: ignore[index]
    # 2 MiB at 4,000 kbit/s (500,000 B/s) takes 4.2 s; the bucket may start a little full.
    assert out["bytes_from_server"] > 2 * MIB, out  # type: ignore[index]
    assert out["seconds"] >= 3.0, out  # type: ignore[index]


def _reflector_served(world: SimpleNamespace, after: int) -> int:
    """The reflector's bytes_served once its saved counters pass `after` (they are saved
    every two seconds)."""
    wait_for(lambda: world.refl.counters()["bytes_served"] > after, 30, "the counters")
    return world.refl.counters()["bytes_served"]


def test_a_file_restore_reads_through_the_reflector_and_the_server_when_it_is_down(branch):
    world = branch
    agent = world.agents[2]
    big = agent.root / "home/ann/film.bin"
    content = random.Random(14).randbytes(MIB)  # incompressible: bytes on the wire show
    big.write_bytes(content)
    centralized(agent.backup())  # a snapshot holding it, and a check-in: the route
    served = world.refl.counters()["bytes_served"]
    from_server = info(world.server, world.refl.id)["bytes_from_server"]
    big.unlink()
    out = strata_json(*agent.cmd("restore", "home/ann/film.bin", "--yes"))
    assert big.read_bytes() == content
    assert out["reflector"]["chunks_from_reflector"] > 0, out  # type: ignore[index]
    assert not out["reflector"]["reflector_failures"], out  # type: ignore[index]
    # The reflector fetched the file once over the WAN and served it; the agent's own
    # traffic with the server is the manifest and the report, not the file.
    assert out["bytes_from_server"] < MIB / 4, out  # type: ignore[index]
    assert info(world.server, world.refl.id)["bytes_from_server"] - from_server > MIB * 0.9
    assert _reflector_served(world, served) - served > MIB * 0.9

    big.unlink()
    world.refl.kill()
    try:
        out = strata_json(*agent.cmd("restore", "home/ann/film.bin", "--yes"))
        assert big.read_bytes() == content
        assert out["reflector"]["chunks_from_reflector"] == 0, out  # type: ignore[index]
        why = list(out["reflector"]["reflector_failures"].values())  # type: ignore[index]
        assert why and why[0].startswith("down"), out
        assert out["bytes_from_server"] > MIB * 0.9, out  # type: ignore[index]
    finally:
        world.refl.start(poll=3600)


# -- file deltas through the reflector (issue 17) ---------------------------------------------


def _mutate(data: bytes, seed: int) -> bytes:
    """A rebuilt binary, roughly: a byte changed every 1,500 and a few inserted, so no
    chunk of the old file survives while a delta stays small."""
    out = bytearray(data)
    for pos in range(seed % 1500, len(out), 1500):
        out[pos] ^= 0x5A
    out[len(out) // 2:len(out) // 2] = random.Random(seed).randbytes(7)
    return bytes(out)


# Files every version holds alike (their times too): what makes a manifest's delta pay.
ALIKE = {f"usr/share/doc/note{i:03}.txt": f"note {i}\n".encode() * 40 for i in range(200)}


def _capture_files(world: SimpleNamespace, version: int, files: dict[str, bytes]) -> Path:
    layer = world.base / f"layer{version}"
    for rel, data in {**ALIKE, **files}.items():
        (layer / rel).parent.mkdir(parents=True, exist_ok=True)
        (layer / rel).write_bytes(data)
        os.utime(layer / rel, (1_700_000_000, 1_700_000_000))
    (layer / "etc").mkdir(parents=True, exist_ok=True)
    (layer / "etc/os-release").write_text(f"NAME=test {version}\n")
    world.server.admin_cli("layer", "capture", "--kind", "base", "--name", "os", "--version",
                           version, "--from-dir", layer)
    return layer


def _assign(world: SimpleNamespace, agents: list[Agent], version: int) -> None:
    ids = [x for a in agents for x in ("--endpoint", a.endpoint_id)]
    world.server.admin_cli("assign", *ids, "--base", f"os:{version}")


def _apply(agents: list[Agent], tell: bool = True) -> None:
    for a in agents:
        assert strata_json(*a.cmd("apply"))["state"] == "applied"  # type: ignore[index]
        if tell:  # the server hears what it runs now (the old files of the next delta)
            a.run_once()


DELTA_FILES = {f"opt/delta/app{i}.bin": random.Random(20 + i).randbytes(768 << 10)
               for i in range(2)}


def test_two_agents_rebuild_from_one_delta_the_server_sent_the_reflector_once(branch):
    world = branch
    pair = world.agents[:2]
    _capture_files(world, 20, DELTA_FILES)
    _assign(world, pair, 20)
    for out in run_all([a.cmd("run", "--once") for a in pair]):
        ready(out)  # type: ignore[arg-type]
    _apply(pair)
    new = {rel: _mutate(data, i) for i, (rel, data) in enumerate(DELTA_FILES.items())}
    layer = _capture_files(world, 21, new)
    _assign(world, pair, 21)
    status = world.refl.counters()
    metrics = {k: world.server.metric(f'strata_file_deltas_total{{outcome="{k}"}}')
               for k in ("sent", "manifest", "to-reflector")}
    updates = [ready(a.run_once()) for a in pair]  # one after the other: a miss, then a hit
    for u in updates:
        assert u["files_by_delta"] == len(new) + 1, u  # etc/os-release joined their group
        # The files' delta and the layer manifest's, both from the reflector.
        assert u["reflector"]["deltas_from_reflector"] == 2, u
        assert not u["reflector"]["reflector_failures"], u
        # The agent's own traffic with the server: manifests, the offer, reports; not the
        # 1.5 MiB of changed files, nor their delta.
        assert u["bytes_downloaded"] < 256 << 10, u
    # The server sent each delta's body once, to the reflector; none to the agents.
    assert world.server.metric('strata_file_deltas_total{outcome="to-reflector"}') == \
        metrics["to-reflector"] + 2
    for k in ("sent", "manifest"):
        assert world.server.metric(f'strata_file_deltas_total{{outcome="{k}"}}') == metrics[k]
    wait_for(lambda: world.refl.counters().get("deltas_served", 0) >=
             status.get("deltas_served", 0) + 4, 30, "the reflector's counters")
    now = world.refl.status()  # as `strata reflector status --json` shows them
    assert now["deltas_from_server"] == status.get("deltas_from_server", 0) + 2, now
    assert now["deltas_served"] == status.get("deltas_served", 0) + 4, now
    print(f"delta WAN bytes: {now['bytes_from_server'] - status.get('bytes_from_server', 0)} "
          f"(reflector, chunks of etc/os-release included); agents' own: "
          f"{[u['bytes_downloaded'] for u in updates]}")

    _hostile_delta_requests(world, pair[0], DELTA_FILES, new)
    _apply(pair[:1])  # the next test updates agent 0 from here
    _apply(pair[1:], tell=False)
    for a in pair:
        for rel in new:
            assert (a.root / rel).read_bytes() == (layer / rel).read_bytes()


def _hostile_delta_requests(world: SimpleNamespace, agent: Agent, old: dict[str, bytes],
                            new: dict[str, bytes]) -> None:
    """A delta ticket reads exactly the deltas the server offered this endpoint, at this
    reflector, until it expires; each refusal is one plain line."""
    from strata.engine.delta import group_key
    from strata.model.ids import content_id

    files = [{"old": content_id(old[r]).hex(), "new": content_id(new[r]).hex()}
             for r in sorted(new)]
    with agent.http() as http:
        resp = http.post("/api/v1/agent/layers/delta-offer", json={
            "groups": [{"files": files, "lacking": 1 << 20}], "reflectors": [world.refl.id]})
        assert resp.status_code == 200, resp.text
        offer = resp.json()
    [delta] = offer["deltas"]
    assert delta["new_key"] == group_key([content_id(new[r]) for r in sorted(new)]).hex()

    def ask(ticket: str, did: str = delta["id"]) -> httpx.Response:
        return web.get(f"{world.refl.url}/api/v1/agent/deltas/{did}", timeout=30,
                       headers={"Authorization": f"Bearer {ticket}"})

    def refused(resp: httpx.Response, why: str) -> None:
        assert resp.status_code == 403, resp.text
        detail = resp.json()["detail"]
        assert why in detail and "\n" not in detail, detail

    ok = ask(offer["ticket"])
    assert ok.status_code == 200 and content_id(ok.content).hex() == delta["id"]
    assert len(ok.content) == delta["size"]
    # The endpoint's read ticket names layers, not deltas; nor does another endpoint's
    # (a genuine ticket of endpoint 2, which holds no old file of this group).
    refused(ask(_ticket_of(agent)["ticket"]), "does not allow reading that delta")
    refused(ask(_ticket_of(world.agents[2])["ticket"]), "does not allow reading that delta")
    # Forged (another key), tampered (another endpoint under the server's signature),
    # expired, for another reflector.
    parsed = json.loads(base64.urlsafe_b64decode(offer["ticket"].split(".")[0] + "=="))
    now = int(time.time())
    mine = Ticket(agent.endpoint_id, (world.refl.id,), frozenset(), False, now, now + 600,
                  frozenset(parsed["d"]))
    refused(ask(TicketSigner(world.base / "forged.key").sign(mine)), "signature")
    other = base64.urlsafe_b64encode(json.dumps(
        {**parsed, "e": world.agents[2].endpoint_id}).encode()).rstrip(b"=").decode()
    refused(ask(f"{other}.{offer['ticket'].split('.')[1]}"), "signature")
    server_key = TicketSigner(world.server.data / "reflector-tickets.key")
    refused(ask(server_key.sign(Ticket(agent.endpoint_id, (world.refl.id,), frozenset(),
                                       False, now - 7200, now - 3600, mine.deltas))),
            "expired")
    refused(ask(server_key.sign(Ticket(agent.endpoint_id, ("0" * 36,), frozenset(), False,
                                       now, now + 60, mine.deltas))), "not for this reflector")
    # Another delta than the ticket names (with a valid ticket).
    refused(ask(offer["ticket"], "ab" * 32), "does not allow reading that delta")
    # The probe the server's check stops: an endpoint that is not assigned the new files
    # gets no ticket for their delta at all.
    with world.agents[2].http() as http:
        resp = http.post("/api/v1/agent/layers/delta-offer", json={
            "groups": [{"files": files, "lacking": 1 << 20}], "reflectors": [world.refl.id]})
    assert resp.status_code == 403 and "not part of this endpoint's layers" in resp.text
    # Malformed or oversized asks: one plain line each.
    with agent.http() as http:
        url = "/api/v1/agent/layers/delta-offer"
        resp = http.post(url, json={"groups": [{"files": files[:1], "lacking": 1}] * 65,
                                    "reflectors": [world.refl.id]})
        assert resp.status_code == 413 and "at most 64 groups" in resp.text, resp.text
        resp = http.post(url, json={"groups": [{"files": files, "lacking": 1}],
                                    "reflectors": ["../../etc"]})
        assert resp.status_code == 422, resp.text
    assert web.get(f"{world.refl.url}/api/v1/agent/deltas/{delta['id']}",
                   timeout=30).status_code == 401
    assert ask(offer["ticket"], "not-an-id").status_code == 422
    # The reflector's credential with a ticket that does not name a delta: nothing.
    cred = json.loads((world.refl.state / "reflector.json").read_text())["credential"]
    resp = web.post(world.server.url + f"/api/v1/reflector/deltas/{'ab' * 32}", timeout=30,
                    headers={"Authorization": f"Bearer {cred}"},
                    json={"ticket": offer["ticket"]})
    assert resp.status_code == 404, resp.text


def _enroll_bad(world: SimpleNamespace, bad: BadReflector, name: str) -> str:
    token = world.server.admin("POST", "/tokens", {"uses": 1, "purpose": "reflector"})["token"]
    resp = web.post(world.server.url + "/api/v1/reflector/enroll", timeout=30, json={
        "token": token, "name": name, "url": bad.url})
    assert resp.status_code == 200, resp.text
    rid = resp.json()["reflector_id"]
    _route_to(world, rid)
    return rid


def _route_to(world: SimpleNamespace, rid: str) -> None:
    rules = world.base / f"route-{rid}.json"
    rules.write_text(json.dumps({"rules": [{"subnet": "127.0.0.0/8", "reflectors": [rid]}]}))
    world.server.admin_cli("policy", "set", "reflectors", rules, "--replace", "--yes")


def test_a_reflector_serving_a_bad_delta_is_caught_and_the_server_sends_it(branch):
    world = branch
    agent = world.agents[0]  # on os:21 (the test before)
    old = {rel: _mutate(data, i) for i, (rel, data) in enumerate(DELTA_FILES.items())}
    new = {rel: _mutate(data, 7 + i) for i, (rel, data) in enumerate(old.items())}
    layer = _capture_files(world, 22, new)
    bad = BadReflector({})
    try:
        evil = _enroll_bad(world, bad, "evil-deltas")
        _assign(world, [agent], 22)
        update = ready(agent.run_once())
        assert bad.deltas == 1, bad.deltas
        # The body failed its id: reported, and the server sent the delta instead.
        why = list(update["reflector"]["reflector_failures"].values())
        assert why and why[0].startswith("corrupt: delta"), update
        assert update["reflector"]["deltas_from_reflector"] == 0, update
        assert update["files_by_delta"] == len(new) + 1, update
        print(f"agent's own traffic with the server, deltas from the server: "
              f"{update['bytes_downloaded']}")
        shown = info(world.server, evil)
        assert shown["status"] == "quarantined" and shown["bad_chunks"] == 1, shown
    finally:
        bad.close()
        _route_to(world, world.refl.id)
    _apply([agent], tell=False)
    for rel in new:
        assert (agent.root / rel).read_bytes() == (layer / rel).read_bytes()

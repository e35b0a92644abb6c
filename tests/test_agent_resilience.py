"""The agent against a hostile world, with real processes: killed mid-upload (the next run
sends only what the server never acknowledged), the server killed mid-upload, no server at
all (work offline, resume), and bandwidth caps (local and by server policy) plus upload
exclusions set by the administrator."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from server_fixtures import (
    MIB,
    Agent,
    Server,
    centralized,
    file_map,
    finish,
    kill_group,
    random_tree,
    running_server,
    spawn,
    strata,
    strata_json,
    wait_for,
    write_random,
)
from strata.server.policies import LINUX_EXCLUSIONS

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(tmp_path: Path):
    yield from running_server(tmp_path / "server-data")


def endpoint(server: Server, base: Path, name: str = "laptop") -> Agent:
    """An enrolled endpoint with an empty-ish root (etc/hostname only)."""
    root = base / f"{name}-root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text(name + "\n")
    agent = Agent(server, root, base / f"{name}-state")
    assert agent.enroll(server.create_token())["state"] == "active"
    return agent


def received(server: Server) -> float:
    return server.metric("strata_bytes_received_total")


def settled_unique_bytes(server: Server) -> int:
    """The raw bytes of distinct chunks the server holds, once they stop changing."""
    last = -1
    while True:
        now = server.admin("GET", "/stats")["unique_bytes"]
        if now == last:
            return now
        last = now
        time.sleep(0.5)


def store_check(server: Server) -> dict:
    doc = strata_json("store", "check", server.store, "--read-data")
    assert doc["ok"] is True, doc
    return doc


def backup_until(server, agent, rate: str, nbytes: float, what: str):
    """Start `agent backup` capped at `rate`; return it once the server has received
    `nbytes` (the backup must still be running then, or the test proves nothing)."""
    before = received(server)
    proc = spawn(*agent.cmd("backup", "--limit-upload", rate, "--json"))
    reached = wait_for(lambda: proc.poll() is not None
                       or received(server) - before >= nbytes, timeout=180)
    if not (reached and proc.poll() is None):
        kill_group(proc)
        raise AssertionError(f"the backup ended before {what} could be killed", finish(proc))
    return proc


def test_killed_agent_resumes_without_resending_acknowledged_chunks(server, tmp_path):
    agent = endpoint(server, tmp_path)
    total = random_tree(agent.root, 64 * MIB, seed=7, sizes=(1 * MIB, 8 * MIB))
    proc = backup_until(server, agent, "20M", 0.4 * total, "it")
    kill_group(proc)
    acknowledged = settled_unique_bytes(server)
    assert 0 < acknowledged < 0.9 * total, (acknowledged, total)
    assert agent.snapshots() == []  # nothing was committed

    r = centralized(agent.backup("--limit-upload", "20M"))
    print(f"\nkilled after the server held {acknowledged:,} of {total:,} B; the second run "
          f"sent {r['bytes_sent']:,} B (server lacked {r['bytes_new']:,} B)")
    assert r["bytes_read"] >= total  # no files cache yet: everything read again ...
    assert r["bytes_sent"] <= total - acknowledged + 0.10 * total, r  # ... not resent
    assert r["bytes_new"] <= total - acknowledged + 0.02 * total, r

    out = tmp_path / "restored"
    restored = agent.restore("home", "etc", snapshot=r["snapshot"], to=out)
    assert not restored["errors"]
    assert file_map(out) == file_map(agent.root)
    server.stop()
    store_check(server)


def test_killed_server_during_upload_loses_nothing(server, tmp_path):
    agent = endpoint(server, tmp_path)
    write_random(agent.root / "home/user/first.bin", 2 * MIB, random.Random(1))
    first = centralized(agent.run_once())["snapshot"]
    big = random_tree(agent.root, 40 * MIB, seed=8, sizes=(2 * MIB, 6 * MIB))
    proc = backup_until(server, agent, "10M", 0.3 * big, "the server")
    try:
        server.kill()
        server.start()  # same data directory, same port
        rc, stdout, stderr = finish(proc)
    finally:
        kill_group(proc)
    # The agent either rode out the restart on its retries or gave up as offline (exit 3).
    assert rc in (0, 3), (rc, stdout, stderr)
    assert "Traceback" not in stderr, stderr
    assert rc == 0 or "offline" in json.loads(stdout), stdout
    print(f"\nagent during the server's kill and restart: exit {rc}, "
          + (f"{json.loads(stdout)['result']['retries']} retries" if rc == 0 else "offline"))

    last = centralized(agent.backup())
    ids = [s["id"] for s in agent.snapshots()]
    assert ids[0] == first and ids[-1] == last["snapshot"], ids
    out = tmp_path / "restored"
    assert not agent.restore("home", to=out)["errors"]
    assert file_map(out / "home") == file_map(agent.root / "home")
    server.stop()
    assert store_check(server)["snapshots"] == len(ids)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory):
    """An endpoint enrolled, then its server stopped before it ever centralized; one
    `agent run --once` and one `agent status` while the server is down. (Module-scoped:
    the offline run waits out the agent's retries, so two tests share it.)"""
    base = tmp_path_factory.mktemp("offline")
    for server in running_server(base / "server-data"):
        agent = endpoint(server, base)
        write_random(agent.root / "home/user/work.bin", MIB, random.Random(3))
        server.stop()
        started = time.monotonic()
        proc = strata(*agent.cmd("run", "--once", "--json"), rc=3)  # 3: offline, will retry
        out = json.loads(proc.stdout)
        yield SimpleNamespace(server=server, agent=agent, out=out, status=agent.status(),
                              seconds=time.monotonic() - started)


def test_agent_works_offline_and_resumes(offline_run):
    agent, out, status = offline_run.agent, offline_run.out, offline_run.status
    assert out["checked_in"] is False and "cannot reach" in out["offline"], out
    assert offline_run.seconds < 60
    assert status["server_reachable"] is False
    assert status["last_centralization"] is None

    offline_run.server.start()
    r = centralized(agent.run_once())
    assert r["kind"] == "centralize" and r["files"] == 2
    after = agent.status()
    assert after["server_reachable"] is True and after["pending_work"] == []
    assert after["last_centralization"]["snapshot"] == r["snapshot"]


def test_offline_agent_records_centralization_as_pending_work(offline_run):
    assert "centralize" in offline_run.status["pending_work"], offline_run.status


def test_upload_limit_is_respected(server, tmp_path):
    agent = endpoint(server, tmp_path)
    size, rate = 12 * MIB, 2 * MIB
    write_random(agent.root / "home/user/video.bin", size, random.Random(4))
    before = received(server)
    r = centralized(agent.backup("--limit-upload", "2M"))
    on_server = received(server) - before  # request bodies, check-in included
    print(f"\n{size:,} B at --limit-upload 2M: {r['seconds']:.1f}s "
          f"(unthrottled would be {size / rate:.1f}s at the cap)")
    assert r["bytes_sent"] >= size
    assert r["seconds"] >= 0.8 * size / rate, r
    assert r["seconds"] < 3 * size / rate + 30, r
    # The agent's count of bytes on the wire agrees with what the server received.
    assert on_server - 16_384 <= r["bytes_sent"] <= on_server + 65_536, (on_server, r)


def test_server_bandwidth_and_exclusion_policies_apply_to_agents(server, tmp_path):
    bandwidth = tmp_path / "bandwidth.json"
    bandwidth.write_text(json.dumps({"rules": [
        {"subnet": "10.0.0.0/8", "upload_kbps": 64},  # not us: the first match wins
        {"subnet": "127.0.0.0/8", "upload_kbps": 8192}]}))  # kilobits: 1,024,000 B/s
    upload = tmp_path / "upload.json"
    upload.write_text(json.dumps({"interval_seconds": 3600, "exclusions": {
        "linux": LINUX_EXCLUSIONS + ["/home/*/cache/"], "windows": []}}))
    server.admin_cli("policy", "set", "bandwidth", bandwidth)
    server.admin_cli("policy", "set", "upload", upload)
    shown = json.loads(server.admin_cli("policy", "show", "upload").stdout)
    assert "/home/*/cache/" in shown["exclusions"]["linux"]

    agent = endpoint(server, tmp_path)
    size = 5 * MIB
    rng = random.Random(5)
    write_random(agent.root / "home/alice/data.bin", size, rng)
    write_random(agent.root / "home/alice/cache/thumbs.db", 3 * MIB, rng)
    write_random(agent.root / "home/bob/cache/index.bin", 100_000, rng)
    (agent.root / "home/alice/notes.txt").write_text("keep me\n")
    r = centralized(agent.run_once())
    print(f"\n{size:,} B under an 8192 kbps policy: {r['seconds']:.1f}s, sent "
          f"{r['bytes_sent']:,} B")
    assert r["seconds"] >= 0.9 * size / 1_024_000, r  # about 5 s: kbps are kilobits
    assert r["bytes_sent"] < size + 3 * MIB  # the cache did not travel

    entries = strata_json("store", "ls", server.store, r["snapshot"])
    paths = {e["path"] for e in entries}
    assert {"home/alice/data.bin", "home/alice/notes.txt", "etc/hostname"} <= paths
    assert not [p for p in paths if "/cache" in p], sorted(paths)
    assert "home/alice/cache" not in paths
    shown = strata("endpoint", "show", agent.endpoint_id, "--server", server.url,
                   "--admin-token-file", server.token_file, "--json")
    assert json.loads(shown.stdout)["last_snapshot"] == r["snapshot"]

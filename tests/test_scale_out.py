"""Two server processes on one PostgreSQL catalog and one S3 store (moto), as a load
balancer would spread a fleet over them: any process serves any endpoint, a restore
through the other process is byte-identical, prune on one while the other takes uploads
loses nothing, a process killed with SIGKILL mid-upload loses nothing, and the store
checks clean (reading every chunk) at the end.

Both processes share one data directory (its admin token, proof key, signed metadata);
everything they must agree on is in the database (docs/deployment.md). The tests run in
file order on one module-scoped world.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import create_engine

import web
from server_fixtures import (
    MIB,
    Agent,
    Server,
    build_os_tree,
    centralized,
    device,
    file_map,
    finish,
    kill_group,
    spawn,
    strata,
    strata_json,
    tree_bytes,
    wait_for,
    write_random,
)
from strata.store.pg_shared import PgShared

pytestmark = pytest.mark.e2e

OS_BUDGET = 12 * MIB
OWN = 256 << 10  # each endpoint's own (random) data
OVERHEAD = 64 << 10  # protocol chatter allowed per run


def _server(data: Path, name: str, catalog: str, args: list[object]) -> Server:
    srv = Server(data, args=args, catalog=catalog)
    srv.log = data.parent / f"{name}.server.log"
    return srv


def talk_to(agent: Agent, server: Server) -> None:
    """Send the agent to the other process, as a load balancer may at any request."""
    path = agent.state / "credential.json"
    doc = json.loads(path.read_text())
    doc["server"] = server.url
    path.write_text(json.dumps(doc))
    agent.server = server


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pg_cluster, s3):
    base = tmp_path_factory.mktemp("scale-out")
    bucket = s3.new_bucket()
    env = pytest.MonkeyPatch()  # the servers and the CLI read the AWS variables
    for name, value in {**s3.env(), "AWS_EC2_METADATA_DISABLED": "true"}.items():
        env.setenv(name, value)
    catalog = pg_cluster.new_database("scaleout")
    where = f"s3://{bucket}/site"
    data = base / "data"
    # The first process creates the store; the second joins it.
    one = _server(data, "one", catalog, ["--store", where]).start()
    two = _server(data, "two", catalog, ["--store", where]).start()
    os_tree = base / "os-tree"
    build_os_tree(os_tree, OS_BUDGET)
    roots, agents = [], []
    for i in range(1, 5):
        root = base / f"endpoint-{i}"
        shutil.copytree(os_tree, root, symlinks=True)
        write_random(root / f"home/user{i}/own.bin", OWN, random.Random(i))
        (root / "etc/hostname").write_text(f"endpoint-{i}\n")
        roots.append(root)
        # Endpoints 1 and 2 enroll through the first process, 3 and 4 through the second.
        agent = Agent(one if i <= 2 else two, root, base / f"state-{i}")
        agent.enroll(agent.server.create_token())
        agents.append(agent)
    w = SimpleNamespace(one=one, two=two, agents=agents, roots=roots, bucket=bucket,
                        where=where, data=data, base=base, results={})
    try:
        yield w
    finally:
        for srv in (w.one, w.two):
            srv.stop()
            srv.kill()
        env.undo()
        s3.drop_bucket(bucket)


def test_agents_on_both_processes_centralize_and_copies_send_under_one_percent(world):
    first = centralized(world.agents[0].run_once())  # brings the OS, through process one
    assert first["bytes_new"] >= tree_bytes(world.roots[0]) * 0.5
    world.results[1] = first
    # Endpoint 2 through process one, 3 and 4 through process two: each is a second copy
    # of the OS and sends its own data and under 1 % of the rest, whichever it talks to.
    for i in (2, 3, 4):
        r = centralized(world.agents[i - 1].run_once())
        size = tree_bytes(world.roots[i - 1])
        print(f"endpoint {i} via {world.agents[i - 1].server.url}: tree {size:,} B, "
              f"sent {r['bytes_sent']:,} B ({(r['bytes_sent'] - OWN) / size:.3%} beyond "
              "its own data)")
        assert OWN <= r["bytes_sent"] < OWN + 0.01 * size + OVERHEAD, (i, r, size)
        assert r["chunks_proven"] > 0
        world.results[i] = r
    # Every process sees every endpoint and snapshot (one catalog).
    for srv in (world.one, world.two):
        listed = srv.admin("GET", "/endpoints")
        assert sorted(e["snapshots"] for e in listed) == [1, 1, 1, 1]


def test_restore_through_the_other_process_is_byte_identical(world, tmp_path):
    agent, root = world.agents[0], world.roots[0]  # centralized through process one
    talk_to(agent, world.two)
    out = tmp_path / "restored"
    tops = sorted(p.name for p in root.iterdir())
    r = agent.restore(*tops, to=out)
    assert not r["errors"], r
    assert file_map(out) == file_map(root)


def test_prune_on_one_process_while_the_other_takes_uploads_loses_nothing(world, tmp_path):
    # Keep one snapshot per endpoint: every later backup makes the one before prunable.
    world.one.admin("PUT", "/policies/retention",
                    {"last": 1, "hourly": 0, "daily": 0, "weekly": 0, "monthly": 0,
                     "yearly": 0})
    agent, root = world.agents[1], world.roots[1]
    assert agent.server is world.one
    rng = random.Random(77)
    summaries = []
    for j in range(3):  # rounds of new data, each upload racing maintenance on process two
        write_random(root / f"home/user2/round-{j}.bin", 3 * MIB, rng)
        (root / f"home/user2/{'own' if j == 0 else f'round-{j - 1}'}.bin").unlink()
        proc = spawn(*agent.cmd("backup"), "--json")
        during = 0
        while proc.poll() is None:
            summaries.append(world.two.admin("POST", "/maintenance"))
            during += 1
        rc, out, err = finish(proc)
        assert rc == 0, (out, err)
        assert during >= 1
        centralized(json.loads(out))
    # With no upload in flight, a last pass frees what the forgotten snapshots held.
    summaries.append(world.two.admin("POST", "/maintenance"))
    assert all("error" not in s["prune"] for s in summaries), summaries
    assert sum(s["snapshots_removed"] for s in summaries) == 3
    freed = sum(s["prune"]["deleted_packs"] + s["prune"]["repacked_packs"] for s in summaries)
    print(f"{len(summaries)} maintenance passes, {freed} packs deleted or repacked, "
          f"{sum(s['prune']['plan']['exempt'] for s in summaries)} exempt (uploads in flight)")
    assert freed > 0
    out = tmp_path / "after-prune"
    r = agent.restore("home", "etc", "usr", to=out)
    assert not r["errors"], r
    assert file_map(out) == {k: v for k, v in file_map(root).items()
                             if k.split("/")[0] in ("home", "etc", "usr")}


def test_maintenance_runs_in_one_process_at_a_time(world):
    """While one process holds the maintenance lock (here: the test, as a third process
    would), another is refused with a 409 rather than pruning beside it."""
    store_id = web.get(world.one.url + "/api/v1/health", timeout=30).json()["store"]
    engine = create_engine(world.one.catalog.replace("postgresql://", "postgresql+psycopg://"))
    try:
        _, coordination = PgShared(engine.raw_connection).open(store_id)
        with coordination.exclusive("maintenance", what="maintenance"):
            busy = web.post(world.two.url + "/api/v1/admin/maintenance", timeout=60,
                            headers={"Authorization": f"Bearer {world.two.admin_token}"})
            assert busy.status_code == 409, busy.text
            assert "running in another server process" in busy.json()["detail"]
        assert "prune" in world.two.admin("POST", "/maintenance")  # free again
    finally:
        engine.dispose()


def test_kill_9_of_one_process_mid_upload_loses_nothing(world, tmp_path):
    agent, root = world.agents[3], world.roots[3]  # enrolled through process two
    assert agent.server is world.two
    write_random(root / "home/user4/big.bin", 48 * MIB, random.Random(404))
    spool = world.data / "store-state" / "tmp"
    proc = spawn(*agent.cmd("backup"), "--json")
    try:
        # Kill process two once it is writing a pack of this upload.
        assert wait_for(lambda: any(spool.glob("pack-*.tmp")) or proc.poll() is not None,
                        120)
        assert proc.poll() is None, "the upload finished before the kill"
        world.two.proc.send_signal(signal.SIGKILL)
        world.two.proc.wait(30)
        rc, _, _ = finish(proc, 300)
    except BaseException:
        kill_group(proc)
        raise
    assert rc != 0  # the agent was cut off: it committed nothing
    # The load balancer sends it to the surviving process, which takes the upload over.
    talk_to(agent, world.one)
    r = centralized(agent.backup())
    assert r["bytes_sent"] < 60 * MIB
    out = tmp_path / "after-kill"
    assert not agent.restore("home", "etc", "usr", to=out)["errors"]
    assert file_map(out) == {k: v for k, v in file_map(root).items()
                             if k.split("/")[0] in ("home", "etc", "usr")}
    # The killed process comes back on the same data directory and serves again.
    world.two = _server(world.data, "two", world.two.catalog, world.two.args)
    world.two.start()
    assert len(world.two.admin("GET", "/endpoints")) == 4


def test_changes_through_one_process_hold_on_the_other_within_a_second(world):
    # A revoked device: process two cached its credential; one revokes it.
    agent = world.agents[2]  # enrolled through process two; not used after this
    with device(world.two, agent.credential) as http:
        assert http.get("/api/v1/agent/snapshots").status_code == 200  # cached now
        world.one.admin("POST", f"/endpoints/{agent.endpoint_id}/revoke")
        started = time.monotonic()
        assert wait_for(lambda: http.get("/api/v1/agent/snapshots").status_code != 200, 10)
        print(f"revocation through one refused on two after {time.monotonic() - started:.2f} s")
        assert http.get("/api/v1/agent/snapshots").status_code in (401, 403)
    # The admin token rotated through one process is the only one either accepts.
    old = world.one.admin_token
    world.one.admin("POST", "/admin-token/rotate")
    assert world.one.admin_token != old
    for srv in (world.one, world.two):
        refused = web.get(srv.url + "/api/v1/admin/endpoints", timeout=30,
                          headers={"Authorization": f"Bearer {old}"})
        assert refused.status_code == 403
        assert len(srv.admin("GET", "/endpoints")) == 4  # with the new one


def test_check_read_data_is_clean_at_the_end(world):
    # A maintenance pass with every upload done: the killed process's spool and packs
    # are tidied by whichever process is elected.
    world.one.admin("POST", "/maintenance")
    snapshots = sum(e["snapshots"] for e in world.one.admin("GET", "/endpoints"))
    for srv in (world.one, world.two):
        srv.stop()
    # A working state of its own: every pack in the bucket is indexed from its trailer.
    state = world.base / "check-state"
    proc = strata("store", "check", world.where, "--state", state, "--read-data")
    assert "no errors" in proc.stdout, proc.stdout
    listed = strata_json("store", "snapshots", world.where, "--state", state)
    assert len(listed) == snapshots == 4
    assert {s["host"] for s in listed} == {a.endpoint_id for a in world.agents}

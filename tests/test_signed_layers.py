"""Signed layers end to end: a real server, the admin CLI signing with its keys, and a real
agent that pinned the server's root at enrollment. A signed base layer is applied; an
unsigned layer, a layer whose metadata was edited on the server's disk (its catalog row,
or the signed metadata file itself) and an older signed version offered again are each
refused by the agent with a clear error, the endpoint keeps what it has, and the server
hears of it (endpoint state and audit log). A server where signing was never set up
refuses assignments and says which command to run.

One server and one endpoint are shared by the module; the tests run in file order.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from server_fixtures import (
    Agent,
    Server,
    admin,
    admin_json,
    assert_one_line_error,
    centralized,
    strata,
    strata_json,
)

pytestmark = pytest.mark.e2e


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("signed")
    trees = {}
    for name, tool in (("v1", "tool v1\n"), ("v2", "tool v2\n"), ("v3", "tool v3\n"),
                       ("evil", "tool with a backdoor\n")):
        ref = base / name
        write(ref / "etc/os-release", 'ID=debian\nVERSION_ID="12"\n')
        write(ref / "usr/bin/tool", tool)
        trees[name] = ref
    root = base / "endpoint"
    shutil.copytree(trees["v1"], root)
    write(root / "etc/hostname", "pc-1\n")
    write(root / "home/alice/report.txt", "alice's report\n")
    server = Server(base / "server").start()
    try:
        agent = Agent(server, root, base / "state")
        agent.enroll(server.create_token())
        centralized(agent.run_once())
        yield SimpleNamespace(server=server, agent=agent, trees=trees, root=root)
    finally:
        server.stop()
        server.kill()


def tool(world) -> str:
    return (world.root / "usr/bin/tool").read_text()


def refused_update(world) -> str:
    """One check-in that must refuse the update; the refusal's sentence."""
    out = world.agent.run_once()
    up = out["update"]
    assert up["state"] == "refused", out
    return up["error"]


def server_heard(world, needle: str) -> None:
    """The endpoint shows the refusal, and the audit log has it under the endpoint."""
    shown = admin_json(world, "endpoint", "show", world.agent.endpoint_id)["layers"]
    assert shown["state"] == "failed" and shown["detail"].startswith("refused:"), shown
    assert needle in shown["detail"], shown
    entries = [e for e in world.server.admin("GET", "/audit?limit=50")
               if e["action"] == "layer-refused" and needle in e["detail"]["detail"]]
    assert entries and entries[0]["actor"] == f"endpoint:{world.agent.endpoint_id}", entries


def current_targets_file(world) -> Path:
    meta = world.server.data / "signing" / "metadata"
    ts = json.loads((meta / "timestamp.json").read_text())
    snap = ts["signed"]["meta"]["snapshot.json"]["version"]
    doc = json.loads((meta / f"{snap}.snapshot.json").read_text())
    return meta / f"{doc['signed']['meta']['targets.json']['version']}.targets.json"


def test_enrollment_pins_the_servers_root(world):
    fingerprint = admin_json(world, "signing", "status")["fingerprint"]
    assert world.agent.status()["signing_root"] == fingerprint


def test_signed_base_layer_is_applied(world):
    for version, tree in (("1", "v1"), ("2", "v2")):
        doc = admin_json(world, "layer", "capture", "--kind", "base", "--name", "os",
                         "--version", version, "--from-dir", world.trees[tree])
        assert doc["signed"] >= 1, doc
    eid = world.agent.endpoint_id
    admin(world, "assign", "--endpoint", eid, "--base", "os:1")
    assert world.agent.run_once()["update"]["state"] == "applied"  # it has v1 already
    admin(world, "assign", "--all", "--base", "os:2")
    assert world.agent.run_once()["update"]["state"] == "ready"
    assert strata_json(*world.agent.cmd("apply"))["state"] == "applied"
    assert tool(world) == "tool v2\n"
    status = admin_json(world, "signing", "status")
    assert status["unsigned_layers"] == [] and "layers/os/2" not in status["assignments"]
    assert {"os:1", "os:2"} <= set(status["layers"])


def test_unsigned_layer_is_refused_and_the_server_hears_of_it(world):
    proc = world.server.admin_cli("layer", "capture", "--kind", "base", "--name", "evil",
                                  "--version", "1", "--from-dir", world.trees["evil"],
                                  sign=False)
    assert "not signed" in proc.stderr
    # The CLI will not assign without the keys ...
    proc = world.server.admin_cli("assign", "--all", "--base", "evil:1", rc=None, sign=False)
    assert_one_line_error(proc, "accept only signed")
    # ... but anyone holding the admin token can call the API: the agent is what refuses.
    world.server.admin("POST", "/assign", {"all": True, "base": "evil:1"})
    error = refused_update(world)
    assert "base layer evil:1 is not signed" in error, error
    assert tool(world) == "tool v2\n"
    server_heard(world, "evil:1 is not signed")
    # Asked again at the next check-in, refused again, reported once.
    assert "evil:1 is not signed" in refused_update(world)
    entries = [e for e in world.server.admin("GET", "/audit?limit=50")
               if e["action"] == "layer-refused"]
    assert len(entries) == 1, entries


def test_layer_swapped_in_the_servers_catalog_is_refused(world):
    """A signed name pointed at other content in the catalog on the server's disk: the
    manifest the agent downloads does not match the signed digest."""
    with sqlite3.connect(world.server.data / "catalog.sqlite") as db:
        (genuine,) = db.execute("SELECT snapshot FROM layers WHERE name='os' "
                                "AND version='2'").fetchone()
        db.execute("UPDATE layers SET snapshot=(SELECT snapshot FROM layers WHERE "
                   "name='evil') WHERE name='os' AND version='2'")
    admin(world, "assign", "--all", "--base", "os:2")  # a genuine, signed assignment
    error = refused_update(world)
    assert "base layer os:2: the manifest the server sent does not match its signature" \
        in error, error
    assert tool(world) == "tool v2\n"
    server_heard(world, "does not match its signature")
    with sqlite3.connect(world.server.data / "catalog.sqlite") as db:
        db.execute("UPDATE layers SET snapshot=? WHERE name='os' AND version='2'", (genuine,))
    admin(world, "assign", "--all", "--base", "os:2")
    out = world.agent.run_once()
    assert "update" not in out, out  # back to what it has applied: nothing to do


def test_signed_metadata_edited_on_the_servers_disk_is_refused(world):
    """The server's copy of the targets metadata edited to bless other bytes under a
    signed name: the signature no longer verifies, and nothing is taken."""
    admin(world, "layer", "capture", "--kind", "base", "--name", "os", "--version", "3",
          "--from-dir", world.trees["v3"])
    admin(world, "assign", "--all", "--base", "os:3")
    path = current_targets_file(world)
    genuine = path.read_bytes()
    doc = json.loads(genuine)
    evil = world.server.admin("GET", "/signing/layers/evil:1")  # facts of the unsigned layer
    target = doc["signed"]["targets"]["layers/os/3"]
    target["hashes"]["sha256"] = "0" * 64
    target["custom"]["strata"]["removes"] = evil["removes"] + ["home"]
    path.write_text(json.dumps(doc))
    error = refused_update(world)
    assert "layer metadata from the server does not verify" in error, error
    assert tool(world) == "tool v2\n"
    server_heard(world, "does not verify")
    proc = admin(world, "signing", "status", rc=1)
    assert "does not verify" in proc.stderr
    path.write_bytes(genuine)
    assert world.agent.run_once()["update"]["state"] == "ready"  # the genuine one is fine
    assert strata_json(*world.agent.cmd("apply"))["state"] == "applied"
    assert tool(world) == "tool v3\n"


def test_older_signed_version_offered_again_is_refused(world):
    """os:1 is still named by the endpoint's old signed assignment; v3 was applied since,
    under a later one. Offering os:1 again (anyone with the admin token can) is a
    rollback; IT signing an assignment back to os:1 is not."""
    eid = world.agent.endpoint_id
    world.server.admin("POST", "/assign", {"endpoints": [eid], "base": "os:1"})
    error = refused_update(world)
    assert "base layer os:1 is older than os:3" in error and "rollback" in error, error
    assert tool(world) == "tool v3\n"
    server_heard(world, "rollback")
    admin(world, "assign", "--endpoint", eid, "--base", "os:1")  # signed, after v3
    assert world.agent.run_once()["update"]["state"] == "ready"
    strata_json(*world.agent.cmd("apply"))
    assert tool(world) == "tool v1\n"


def test_apply_verifies_again(world):
    """Between download and apply, the manifest in the agent's cache is replaced by the
    unsigned layer's: the apply does not use it (it fetches the signed one again)."""
    import zstandard

    admin(world, "assign", "--all", "--base", "os:2")
    assert world.agent.run_once()["update"]["state"] == "ready"
    evil = zstandard.ZstdDecompressor().decompress(
        world.server.admin_raw("GET", "/signing/layers/evil:1/manifest"))
    cached = list((world.agent.state / "layers").glob("*.manifest"))
    assert cached
    for path in cached:
        path.write_bytes(evil)
    assert strata_json(*world.agent.cmd("apply"))["state"] == "applied"
    assert tool(world) == "tool v2\n"


def test_key_rotations_are_followed_by_the_agent(world, tmp_path):
    """New targets and root keys (signed by the old root key): the agent, still pinned on
    the first root, walks the chain and takes what the new keys sign. A wrong passphrase
    stops a command before it changes anything."""
    before = admin_json(world, "signing", "status")
    admin(world, "signing", "rotate", "--role", "targets")
    out = admin_json(world, "signing", "rotate", "--role", "root")
    status = admin_json(world, "signing", "status")
    assert status["fingerprint"] == out["fingerprint"] != before["fingerprint"]
    assert status["targets_keys"] != before["targets_keys"]
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    proc = strata("assign", "--all", "--base", "os:3", "--server", world.server.url,
                  "--admin-token-file", world.server.token_file, rc=None,
                  env={**world.server.signing_env, "STRATA_SIGNING_PASSPHRASE_FILE": str(wrong)})
    assert_one_line_error(proc, "wrong passphrase")
    assert admin_json(world, "endpoint", "show", world.agent.endpoint_id)["layers"][
        "layers"] == ["base os:2"]
    admin(world, "assign", "--all", "--base", "os:3")
    assert world.agent.run_once()["update"]["state"] == "ready"
    strata_json(*world.agent.cmd("apply"))
    assert tool(world) == "tool v3\n"


def test_server_without_signing_says_what_to_run(tmp_path):
    ref = tmp_path / "ref"
    write(ref / "usr/bin/tool", "tool\n")
    root = tmp_path / "endpoint"
    shutil.copytree(ref, root)
    server = Server(tmp_path / "server", signing=False).start()
    try:
        agent = Agent(server, root, tmp_path / "state")
        assert agent.enroll(server.create_token())["signing_root"] is None
        centralized(agent.run_once())
        server.admin_cli("layer", "capture", "--kind", "base", "--name", "os", "--version",
                         "1", "--from-dir", ref)
        proc = server.admin_cli("assign", "--all", "--base", "os:1", rc=None)
        assert_one_line_error(proc, "layer signing is not set up", "strata signing init")
        # Set up afterwards: the endpoint pins the root only with its fingerprint.
        fingerprint = server.init_signing()
        proc = strata(*agent.cmd("trust-root", "--fingerprint", "ab" * 32), rc=None)
        assert_one_line_error(proc, "not " + "ab" * 32, rc=1)
        assert agent.status()["signing_root"] is None
        strata(*agent.cmd("trust-root", "--fingerprint", fingerprint))
        assert agent.status()["signing_root"] == fingerprint
        server.admin_cli("layer", "sign", "os:1")
        server.admin_cli("assign", "--all", "--base", "os:1")
        assert agent.run_once()["update"]["state"] == "applied"
    finally:
        server.stop()
        server.kill()

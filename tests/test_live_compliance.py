"""Compliance is measured on the live tree, not the last snapshot: a file changed,
removed or added under a system path after the last backup shows at once in `strata
agent compliance` on the endpoint (exit 1) and, once reported, in `strata compliance` on
the admin's side (exit 1, marked "live"), without waiting for the next backup. The
report is the endpoint's own word about its own tree, so the server bounds it, keeps it
only for the layers applied now, and lets no endpoint report for another.

One server and one endpoint are shared by the module; the tests run in file order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import web
from server_fixtures import Agent, Server, admin, centralized, strata

pytestmark = pytest.mark.e2e


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("live-compliance")
    ref = base / "ref"
    write(ref / "etc/os-release", 'ID=debian\nVERSION_ID="12"\n')
    write(ref / "etc/motd", "welcome\n")
    write(ref / "usr/bin/tool", "tool v1\n")
    for i in range(50):
        write(ref / f"usr/lib/corp/mod{i}.so", f"module {i}\n" * 100)
    root = base / "endpoint"
    shutil.copytree(ref, root)
    write(root / "etc/hostname", "pc-1\n")
    write(root / "home/alice/report.txt", "alice's report\n")
    server = Server(base / "server").start()
    try:
        agent = Agent(server, root, base / "state")
        agent.enroll(server.create_token())
        centralized(agent.run_once())
        yield SimpleNamespace(server=server, agent=agent, base=base, ref=ref, root=root)
    finally:
        server.stop()
        server.kill()


def agent_compliance(world, rc: int) -> dict:
    proc = strata(*world.agent.cmd("compliance", "--json"), rc=rc)
    return json.loads(proc.stdout)


def admin_report(world, rc: int) -> dict:
    proc = admin(world, "compliance", "--endpoint", world.agent.endpoint_id, "--json", rc=rc)
    return json.loads(proc.stdout)["endpoints"][0]


def test_no_layers_applied_nothing_to_measure(world):
    assert agent_compliance(world, rc=0) == {"state": "no layers applied"}


def test_a_freshly_applied_base_is_compliant(world):
    admin(world, "layer", "capture", "--kind", "base", "--name", "corp-os", "--version", "1",
          "--from-dir", world.ref)
    admin(world, "assign", "--endpoint", world.agent.endpoint_id, "--base", "corp-os:1")
    out = world.agent.run_once()
    assert out["update"]["state"] == "applied", out
    # The cycle that applied it measured the live tree too, and said so.
    assert out["compliance"]["drift"] == 0 and out["compliance"]["recorded"], out
    live = agent_compliance(world, rc=0)
    assert live["score"] == 100.0 and live["managed"] > 50
    assert admin_report(world, rc=0)["score"] == 100.0


def test_drift_after_the_last_backup_shows_at_once(world):
    root = world.root
    (root / "usr/bin/tool").write_text("tool, patched by hand\n")
    (root / "etc/motd").unlink()
    write(root / "usr/bin/rogue", "not from any layer\n")
    write(root / "home/alice/new.txt", "user data is not drift\n")
    # Before: the latest snapshot still says 100%. The agent measures the live tree:
    live = agent_compliance(world, rc=1)
    assert (live["changed"], live["missing"], live["added"]) == (
        ["usr/bin/tool"], ["etc/motd"], ["usr/bin/rogue"]), live
    assert live["recorded"] is True
    rep = admin_report(world, rc=1)
    assert rep["source"] == "live" and rep["drift"] == 3
    assert (rep["changed"], rep["missing"], rep["added"]) == (
        ["usr/bin/tool"], ["etc/motd"], ["usr/bin/rogue"])
    assert rep["layers"]["base corp-os:1"]["drift"] == 2
    # The table says where the figures come from.
    out = admin(world, "compliance", rc=1).stdout
    assert "live" in out
    # On the endpoint, the plain output names each path, and the exit code is 1.
    proc = strata(*world.agent.cmd("compliance"), rc=1)
    assert "changed: usr/bin/tool" in proc.stdout and "missing: etc/motd" in proc.stdout


def test_a_backup_then_measures_the_same_drift_from_its_snapshot(world):
    out = world.agent.backup()
    centralized(out)
    assert out["compliance"]["drift"] == 3, out  # a cycle that centralized measures again
    status = world.agent.status()
    assert status["compliance"]["drift"] == 3, status
    # The snapshot and the live tree agree; either way the admin sees the same drift.
    assert admin_report(world, rc=1)["drift"] == 3


def test_only_changed_files_are_read_to_measure(world):
    """The stat-only walk skips every unchanged file: with one small file changed since
    the last snapshot, measuring reads that file alone, not the 50 modules."""
    write(world.root / "usr/bin/tool", "tool, patched again\n")
    live = agent_compliance(world, rc=1)
    assert live["counts"] == {"changed": 1, "missing": 1, "added": 1}
    assert live["bytes_read"] == len("tool, patched again\n"), live
    # Put back as the layer has it: compliant again, exit 0 (content counts, not mtime).
    (world.root / "usr/bin/tool").write_text("tool v1\n")
    write(world.root / "etc/motd", "welcome\n")
    (world.root / "usr/bin/rogue").unlink()
    live = agent_compliance(world, rc=0)
    assert live["drift"] == 0 and live["score"] == 100.0
    assert admin_report(world, rc=0)["source"] == "live"


def test_the_server_bounds_and_scopes_what_an_endpoint_reports(world):
    http = world.agent.http()
    key = json.loads((world.agent.state / "applied.json").read_text())["key"]
    good = {"key": key, "managed": 10, "counts": {"changed": 1, "missing": 0, "added": 0},
            "changed": ["etc/x"]}
    for bad in ({**good, "counts": {"changed": 0, "missing": 0, "added": 0}},  # lists > counts
                {**good, "managed": 0},  # more drift than managed
                {**good, "changed": ["p"] * 51, "counts": {"changed": 51, "missing": 0,
                                                          "added": 0}, "managed": 60},
                {**good, "changed": ["x" * 5000]},
                {**good, "managed": -1},
                {**good, "layers": {"base x:1": {"managed": 1, "drift": 2}}}):
        resp = http.post("/api/v1/agent/compliance", json=bad)
        assert resp.status_code == 422, (bad, resp.text)
    # A report about layers that are not the applied ones is not kept.
    resp = http.post("/api/v1/agent/compliance", json={**good, "key": "0" * 24})
    assert resp.json() == {"recorded": False, "reason": "not the applied desired state"}
    assert admin_report(world, rc=0)["changed"] == []
    # What the endpoint says is shown as text, never run by the admin's terminal.
    hostile = {**good, "changed": ["usr/bin/\x1b]0;owned\x07\x1b[2Jtool"]}
    assert http.post("/api/v1/agent/compliance", json=hostile).json()["recorded"] is True
    out = admin(world, "compliance", "--endpoint", world.agent.endpoint_id, rc=1).stdout
    assert "\x1b" not in out and "\x07" not in out and "changed: usr/bin/" in out
    # Without a device credential: refused.

    resp = web.post(world.server.url + "/api/v1/agent/compliance", json=good, timeout=30)
    assert resp.status_code == 401


def test_an_endpoint_with_a_live_report_is_deleted_with_it(world):
    eid = world.agent.endpoint_id
    admin(world, "endpoint", "delete", eid, "--yes")
    proc = admin(world, "compliance", "--json", rc=0)
    assert eid not in proc.stdout

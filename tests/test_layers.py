"""Layers end to end on real trees: three endpoints on base v1 with their own user data,
user apps and identity; base v2 pushed (each downloads only what v1 lacked); drift
reported and repaired; a revert with today's user data; a hardware migration swapping the
driver layer; a full restore to new hardware; provisioning; a migration task.

One server and the endpoints are shared by the module; the tests run in file order.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from server_fixtures import (
    MIB,
    Agent,
    Server,
    admin,
    admin_json,
    build_os_tree,
    centralized,
    strata,
    strata_json,
    tree_bytes,
    write_random,
)

pytestmark = pytest.mark.e2e

ENDPOINTS = 3


def tree_state(root: Path, skip: tuple[str, ...] = (".strata-apply",)) -> dict[str, tuple]:
    """path -> (kind, mode, content or link target) for a whole tree."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir.parts and rel_dir.parts[0] in skip:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = (rel_dir / name).as_posix()
            if rel.split("/")[0] in skip:
                continue
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("d", st.st_mode & 0o7777)
            else:
                out[rel] = ("f", st.st_mode & 0o7777, p.read_bytes())
    return out


def under(state: dict[str, tuple], *prefixes: str) -> dict[str, tuple]:
    return {k: v for k, v in state.items() if any(k == p or k.startswith(p + "/")
                                                  for p in prefixes)}


def without(state: dict[str, tuple], *prefixes: str) -> dict[str, tuple]:
    return {k: v for k, v in state.items() if not any(k == p or k.startswith(p + "/")
                                                      for p in prefixes)}


USER_LAYERS = ("home", "etc/hostname", "etc/machine-id", "opt")


def make_bases(base: Path) -> tuple[Path, Path, int]:
    """Base v1 (a generated OS tree) and v2: some files changed, some added, some removed.
    Returns the trees and the bytes of new content v2 brings."""
    v1 = base / "base-v1"
    build_os_tree(v1, 12 * MIB)
    (v1 / "etc/app.conf").write_text("setting = 1\n")
    (v1 / "etc/fstab").write_text("# v1 fstab\n")
    (v1 / "usr/bin").mkdir(parents=True, exist_ok=True)
    (v1 / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho v1\n")
    (v1 / "usr/bin/tool").chmod(0o755)
    (v1 / "usr/bin/old-tool").write_bytes(b"#!/bin/sh\necho going away\n")
    (v1 / "usr/bin/tool-link").symlink_to("tool")
    v2 = base / "base-v2"
    shutil.copytree(v1, v2, symlinks=True)
    rng = random.Random(7)
    new_bytes = 0
    new_bytes += len(write_random(v2 / "usr/lib/newpkg/libnew.so", MIB + 12345, rng))
    (v2 / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho v2\n")
    (v2 / "usr/bin/old-tool").unlink()
    (v2 / "etc/app.conf").write_text("setting = 2\n")
    (v2 / "etc/os-release").write_text('ID=stratatest\nVERSION_ID="2"\n')
    (v2 / "etc/fstab").write_text("# v2 fstab (must not override the endpoint's)\n")
    files = sorted(p for p in (v2 / "usr/lib").rglob("*") if p.is_file() and
                   not p.is_symlink() and "newpkg" not in str(p)
                   and p.stat().st_size > 4096)[:5]
    assert len(files) == 5
    for p in files:  # a patched library: one small change in the middle
        data = bytearray(p.read_bytes())
        data[len(data) // 2:len(data) // 2 + 8] = b"PATCHED!"
        p.write_bytes(bytes(data))
    return v1, v2, new_bytes


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("layers")
    v1, v2, v2_new = make_bases(base)
    server = Server(base / "server").start()
    agents = []
    try:
        token = server.create_token(uses=None)
        for i in range(1, ENDPOINTS + 1):
            root = base / f"endpoint-{i}"
            shutil.copytree(v1, root, symlinks=True)
            (root / "etc/hostname").write_text(f"endpoint-{i}\n")
            (root / "etc/machine-id").write_text(f"{i:032x}\n")
            (root / "etc/fstab").write_text(f"# endpoint {i}'s own disks\n")
            write_random(root / f"home/user{i}/mail.pst", 300_000 + i, random.Random(i))
            (root / f"opt/userapp{i}/bin").mkdir(parents=True)
            (root / f"opt/userapp{i}/bin/app").write_text(f"user app {i}\n")
            agent = Agent(server, root, base / f"state-{i}")
            (agent.state).mkdir()
            (agent.state / "hardware.json").write_text(json.dumps(
                {"vendor": "VendorA Inc." if i != 3 else "VendorB Corp", "model": "Model 7"}))
            agent.enroll(token)
            centralized(agent.run_once())
            agents.append(agent)
        yield SimpleNamespace(server=server, agents=agents, v1=v1, v2=v2, v2_new=v2_new,
                              base=base, token=token)
    finally:
        server.stop()
        server.kill()


def endpoint(world, agent: Agent) -> dict:
    return admin_json(world, "endpoint", "show", agent.endpoint_id)


def test_capture_base_layers_from_directories(world):
    l1 = admin_json(world, "layer", "capture", "--kind", "base", "--name", "corp",
                    "--version", "1", "--from-dir", world.v1)
    l2 = admin_json(world, "layer", "capture", "--kind", "base", "--name", "corp",
                    "--version", "2", "--from-dir", world.v2)
    assert l1["files"] > 10 and l2["files"] == l1["files"]  # one added, one removed
    diff = admin_json(world, "layer", "diff", "corp:1", "corp:2")
    assert "usr/lib/newpkg/libnew.so" in diff["added"]
    assert "usr/bin/old-tool" in diff["removed"]
    assert "usr/bin/tool" in diff["changed"]
    shown = admin_json(world, "layer", "show", "corp:2", "--files")
    # The rules keep identity and user data out of a base layer, whatever the tree holds.
    assert "etc/os-release" in shown["file_list"]
    assert not any(p.startswith(("home", "etc/hostname")) for p in shown["file_list"])
    names = {r["ref"] for r in admin_json(world, "layer", "list")}
    assert {"corp:1", "corp:2"} <= names
    # Same name and version twice: refused.
    proc = admin(world, "layer", "capture", "--kind", "base", "--name", "corp", "--version",
                 "1", "--from-dir", world.v1, rc=2)
    assert "already exists" in proc.stderr


def test_assign_v1_matches_what_endpoints_have(world):
    admin(world, "assign", "--all", "--base", "corp:1")
    for agent in world.agents:
        out = agent.run_once()
        assert out["update"]["state"] == "applied", out  # nothing to switch: no restart
        assert endpoint(world, agent)["layers"]["state"] == "applied"


def test_dry_run_reports_changes_and_conflicts(world):
    a1 = world.agents[0]
    # A user-modified system file and a user app overwriting a path v2 brings.
    (a1.root / "etc/app.conf").write_text("setting = mine\n")
    (a1.root / "usr/lib/newpkg").mkdir(parents=True)
    (a1.root / "usr/lib/newpkg/libnew.so").write_bytes(b"user-installed build")
    centralized(a1.backup())
    doc = admin_json(world, "layer", "dry-run", "--endpoint", a1.endpoint_id, "--base",
                     "corp:2")
    kinds = {c["kind"]: c["path"] for c in doc["conflict_list"]}
    assert doc["changes"]["delete"] >= 1 and doc["changes"]["replace"] >= 5, doc
    assert kinds.get("kept") == "etc/fstab"  # do-not-override
    assert kinds.get("local-change-kept") == "etc/app.conf"  # configuration: three-way
    assert "overwrites-user-app" in kinds or "downgrade" in kinds
    assert doc["chunks_to_download"] > 0


def test_push_v2_downloads_only_what_v1_lacked(world):
    admin(world, "assign", "--all", "--base", "corp:2")
    before = {a.endpoint_id: tree_state(a.root) for a in world.agents}
    for agent in world.agents:
        out = agent.run_once()
        up = out["update"]
        assert up["state"] == "ready", up
        # The new library (1 MiB random) plus small patches: nothing already there moves.
        assert up["bytes_downloaded"] < world.v2_new * 1.15 + 200_000, up
        assert up["bytes_downloaded"] > world.v2_new * 0.9, up
        doc = endpoint(world, agent)["layers"]
        assert doc["state"] == "ready" and doc["percent"] == 100.0
        # The console shows what the agent counted (less only the last report's reply).
        assert 0 <= up["bytes_downloaded"] - doc["downloaded_bytes"] < 1000, (up, doc)
        assert tree_state(agent.root) == before[agent.endpoint_id]  # nothing switched yet
    # Endpoints 2 and 3 lacked the same chunks: the server compressed their batch once.
    # (Endpoint 1 lacked others: its local edit of etc/app.conf in the dry-run test is
    # configuration, which stays, so v2's version is not downloaded there.)
    hit = world.server.metric('strata_download_streams_total{cache="hit"}')
    miss = world.server.metric('strata_download_streams_total{cache="miss"}')
    assert (hit, miss) == (1, 2), (hit, miss)
    for agent in world.agents:
        res = strata_json(*agent.cmd("apply"))
        assert res["state"] == "applied" and res["pre_update_snapshot"]
        if agent is world.agents[0]:  # each conflict is named with its file
            assert {"kind": "local-change-kept", "path": "etc/app.conf"}.items() <= \
                next(c for c in res["conflict_list"] if c["path"] == "etc/app.conf").items()
        assert endpoint(world, agent)["layers"]["state"] == "applied"
        now = tree_state(agent.root)
        v2 = tree_state(world.v2)
        # Exactly v2 for every system path, except the do-not-override fstab and
        # configuration changed on the endpoint (endpoint 1's app.conf) ...
        local = ("etc/app.conf",) if agent is world.agents[0] else ()
        expect = without(v2, "etc/fstab", *local)
        assert without(now, *USER_LAYERS, "etc/fstab", "usr/lib/newpkg", *local) == \
            without(expect, "usr/lib/newpkg")
        assert now["usr/lib/newpkg/libnew.so"] == v2["usr/lib/newpkg/libnew.so"]
        assert "usr/bin/old-tool" not in now
        # ... and the endpoint's own layers exactly as they were.
        old = before[agent.endpoint_id]
        assert under(now, *USER_LAYERS, "etc/fstab") == under(old, *USER_LAYERS, "etc/fstab")
    # The endpoint's change to its configuration stays, and the update said so.
    assert (world.agents[0].root / "etc/app.conf").read_text() == "setting = mine\n"
    assert "local-change-kept" in endpoint(world, world.agents[0])["layers"]["detail"]


def test_compliance_reports_drift_and_enforcement_repairs_it(world):
    a1 = world.agents[0]
    doc = json.loads(admin(world, "compliance", "--json", rc=1).stdout)  # 1: drift
    # Endpoint 1's local change to its configuration, kept by the update, is drift.
    scores = {r["endpoint"]: r for r in doc["endpoints"]}
    assert scores.pop(a1.endpoint_id)["changed"] == ["etc/app.conf"], doc
    assert all(r["score"] == 100.0 for r in scores.values()), doc
    tool = a1.root / "usr/bin/tool"
    tool.write_bytes(b"#!/bin/sh\necho hacked\n")
    (a1.root / "etc/app.conf").unlink()
    (a1.root / "usr/bin/intruder").write_text("added outside policy\n")
    centralized(a1.backup())
    rep = json.loads(admin(world, "compliance", "--endpoint", a1.endpoint_id, "--json",
                           rc=1).stdout)["endpoints"][0]
    assert "usr/bin/tool" in rep["changed"] and "etc/app.conf" in rep["missing"]
    assert "usr/bin/intruder" in rep["added"]
    assert rep["score"] < 100.0
    assert rep["layers"]["base corp:2"]["drift"] == 2
    admin(world, "assign", "--endpoint", a1.endpoint_id, "--enforce")
    out = a1.run_once()
    assert out["update"]["state"] in ("applied", "repaired")
    out = a1.run_once()  # enforcement now repairs at check-in
    assert tool.read_bytes() == b"#!/bin/sh\necho v2\n"
    assert (a1.root / "etc/app.conf").read_text() == "setting = 2\n"  # enforced: repaired
    proc = admin(world, "compliance", "--endpoint", a1.endpoint_id, "--json", rc=None)
    rep = json.loads(proc.stdout)["endpoints"][0]
    assert rep["counts"]["changed"] == 0 and rep["counts"]["missing"] == 0
    assert proc.returncode == (1 if rep["drift"] else 0)
    # While enforced, the next check-in alone repairs a new edit (no backup asked for);
    # the snapshot it takes first keeps the user's version.
    tool.write_bytes(b"#!/bin/sh\necho edited again\n")
    out = a1.run_once()
    assert out["centralized"] and out["update"]["state"] == "repaired", out
    assert tool.read_bytes() == b"#!/bin/sh\necho v2\n"
    # Nothing changed since: a check-in takes no snapshot and repairs nothing.
    out = a1.run_once()
    assert not out["centralized"] and "update" not in out, out
    admin(world, "assign", "--endpoint", a1.endpoint_id, "--no-enforce")
    a1.run_once()


def test_revert_brings_v1_back_with_todays_user_data(world):
    a2 = world.agents[1]
    snaps = a2.snapshots()
    pre = [s for s in snaps if s["trigger"] == "pre-update"][-1]
    (a2.root / "home/user2/new-report.txt").write_text("written after the update\n")
    centralized(a2.backup())
    home_now = under(tree_state(a2.root), "home")
    shown = endpoint(world, a2)["layers"]
    assert shown["downloaded_bytes"] > 0 and "1 deleted" in shown["detail"], shown  # v2's
    admin(world, "endpoint", "revert", a2.endpoint_id, "--snapshot", pre["id"], "--yes")
    assert endpoint(world, a2)["layers"]["downloaded_bytes"] == 0  # a new update starts
    out = a2.run_once()
    assert out["update"]["state"] == "ready", out
    strata_json(*a2.cmd("apply"))
    now = tree_state(a2.root)
    v1 = tree_state(world.v1)
    assert without(now, *USER_LAYERS, "etc/fstab") == without(v1, "etc/fstab")
    assert under(now, "home") == home_now
    assert endpoint(world, a2)["layers"]["applied"] == ["base corp:1"]


def test_hardware_migration_swaps_the_driver_layer(world, tmp_path):
    drv_a, drv_b = tmp_path / "drv-a", tmp_path / "drv-b"
    for d, tag in ((drv_a, "a"), (drv_b, "b")):
        (d / f"usr/lib/firmware/vendor-{tag}").mkdir(parents=True)
        write_random(d / f"usr/lib/firmware/vendor-{tag}/fw.bin", 200_000, random.Random(tag))
    admin(world, "layer", "capture", "--kind", "driver", "--name", "drv-a", "--version", "1",
          "--from-dir", drv_a, "--match", "vendor=VendorA*")
    admin(world, "layer", "capture", "--kind", "driver", "--name", "drv-b", "--version", "1",
          "--from-dir", drv_b, "--match", "vendor=VendorB*")
    a3 = world.agents[2]  # VendorB hardware
    out = a3.run_once()
    assert out["update"]["state"] == "ready"
    strata_json(*a3.cmd("apply"))
    assert (a3.root / "usr/lib/firmware/vendor-b/fw.bin").exists()
    assert not (a3.root / "usr/lib/firmware/vendor-a").exists()
    # The machine's hardware changes (motherboard swap): drivers follow.
    (a3.state / "hardware.json").write_text(json.dumps({"vendor": "VendorA Inc.",
                                                        "model": "Model 9"}))
    out = a3.run_once()
    assert out["update"]["state"] == "ready"
    strata_json(*a3.cmd("apply"))
    assert (a3.root / "usr/lib/firmware/vendor-a/fw.bin").read_bytes() == \
        (drv_a / "usr/lib/firmware/vendor-a/fw.bin").read_bytes()
    assert not (a3.root / "usr/lib/firmware/vendor-b").exists()
    assert "driver drv-a:1" in endpoint(world, a3)["layers"]["applied"]


def test_full_restore_to_new_hardware(world):
    a1 = world.agents[0]
    a1.run_once()  # drivers for its VendorA hardware
    strata(*a1.cmd("apply"), rc=None)
    # The endpoint's own files that match do-not-download (a changelog of a tool it
    # installed) are its data: they come along.
    own_changelog = a1.root / "usr/share/doc/own-tool/changelog.Debian.gz"
    own_changelog.parent.mkdir(parents=True, exist_ok=True)
    own_changelog.write_bytes(b"own-tool (1.0) unstable; urgency=low\n")
    centralized(a1.backup())
    old = tree_state(a1.root)
    new_root = world.base / "new-machine"
    new_root.mkdir()
    new = Agent(world.server, new_root, world.base / "state-new")
    new.state.mkdir()
    (new.state / "hardware.json").write_text(json.dumps({"vendor": "VendorB Corp",
                                                         "model": "X1"}))
    new.enroll(world.token)
    said = admin(world, "endpoint", "restore", a1.endpoint_id, "--to-endpoint",
                 new.endpoint_id, "--yes").stdout
    assert "that match the do-not-download rule too" in said, said
    out = new.run_once()
    # Pipelined (the default): laid down in that cycle, boot set first; no restart needed.
    assert out["update"]["state"] == "applied", out
    assert strata_json(*new.cmd("apply"))["state"] == "nothing-to-apply"
    assert new.status()["restore"]["phase"] == "complete"
    now = tree_state(new_root)
    # Identity and user data follow the CVD; drivers were chosen for the new hardware.
    assert (new_root / "etc/hostname").read_text() == "endpoint-1\n"
    assert under(now, "home", "opt") == under(old, "home", "opt")
    assert without(now, "usr/lib/firmware") == without(old, "usr/lib/firmware")
    assert (new_root / "usr/lib/firmware/vendor-b/fw.bin").exists()
    assert not (new_root / "usr/lib/firmware/vendor-a").exists()
    assert (new_root / "usr/share/doc/own-tool/changelog.Debian.gz").read_bytes() == \
        own_changelog.read_bytes()
    # Its first snapshot of the restored tree cost next to nothing on the wire: every file
    # was read again (new inodes), but their chunks are the restored snapshot's (not asked
    # about) and the manifest went as a delta against that snapshot's.
    post = [s["id"] for s in new.snapshots() if s["trigger"] == "post-update"]
    txs = world.server.admin("GET", f"/transactions?endpoint={new.endpoint_id}")
    wire = [t["bytes_on_wire"] for t in txs if t["snapshot"] in post]
    assert len(wire) == 1 and wire[0] <= 0.002 * tree_bytes(new_root), (wire, txs)
    # The old machine is retired; the new one carries the CVD's snapshots on.
    assert endpoint(world, a1)["state"] == "revoked"
    assert len(new.snapshots()) > len([s for s in new.snapshots() if s["trigger"] == "x"])
    world.agents[0] = new


def test_migration_task_and_provisioning(world):
    a2, a3 = world.agents[1], world.agents[2]
    admin(world, "collection", "create", "lab", "--endpoint", a2.endpoint_id,
          "--endpoint", a3.endpoint_id)
    task = admin_json(world, "migrate", "--collection", "lab", "--base", "corp:2")
    assert {r["endpoint"] for r in task["endpoints"]} == {a2.endpoint_id, a3.endpoint_id}
    for agent in (a2, a3):
        agent.run_once()
        strata(*agent.cmd("apply"), rc=None)
    task = admin_json(world, "task", "show", str(task["id"]))
    assert task["state"] == "done" and task["progress"] == 100.0, task
    # Provisioning wipes the system (a user app too) and lays the layers down fresh.
    deltas = world.server.metric("strata_manifest_deltas_total")
    admin(world, "endpoint", "provision", a3.endpoint_id, "--base", "corp:1", "--yes")
    a3.run_once()
    strata_json(*a3.cmd("apply"))
    # The snapshot after the wipe (a fresh CVD: no parent) sent its manifest as a delta
    # against the base layer's; the one before had nothing new (its chunks were held).
    assert world.server.metric("strata_manifest_deltas_total") == deltas + 1
    assert not (a3.root / "opt/userapp3").exists()
    assert (a3.root / "etc/hostname").read_text() == "endpoint-3\n"  # identity kept
    assert (a3.root / "usr/bin/old-tool").exists()
    assert endpoint(world, a3)["layers"]["applied"][0] == "base corp:1"


def test_layer_delete_refused_while_used(world):
    proc = admin(world, "layer", "delete", "corp:2", "--yes", rc=2)
    assert "assigned to or applied on" in proc.stderr

"""A mass assignment as a tracked task, with real agents: one endpoint starts the update,
the task is cancelled (the two that had not started keep their system and are marked
cancelled, the started one finishes), then retried to completion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from server_fixtures import Agent, Server, admin, admin_json, centralized, strata_json

pytestmark = pytest.mark.e2e


def _bases(base: Path) -> tuple[Path, Path]:
    v1 = base / "base-v1"
    (v1 / "usr/bin").mkdir(parents=True)
    (v1 / "usr/lib").mkdir(parents=True)
    (v1 / "etc").mkdir()
    (v1 / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho v1\n")
    (v1 / "usr/lib/libcore.so").write_bytes(bytes(range(256)) * 800)
    (v1 / "etc/os-release").write_text('ID=stratatest\nVERSION_ID="1"\n')
    v2 = base / "base-v2"
    shutil.copytree(v1, v2, symlinks=True)
    (v2 / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho v2\n")
    (v2 / "usr/lib/libnew.so").write_bytes(bytes(reversed(range(256))) * 900)
    (v2 / "etc/os-release").write_text('ID=stratatest\nVERSION_ID="2"\n')
    return v1, v2


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("tasks")
    v1, v2 = _bases(base)
    server = Server(base / "server").start()
    try:
        token = server.create_token(uses=None)
        agents = []
        for i in range(1, 4):
            root = base / f"endpoint-{i}"
            shutil.copytree(v1, root, symlinks=True)
            (root / "etc/hostname").write_text(f"endpoint-{i}\n")
            (root / f"home/user{i}").mkdir(parents=True)
            (root / f"home/user{i}/notes.txt").write_text(f"user {i}'s notes\n")
            agent = Agent(server, root, base / f"state-{i}")
            agent.state.mkdir()
            (agent.state / "hardware.json").write_text(json.dumps(
                {"vendor": "VendorA Inc.", "model": "Model 7"}))
            agent.enroll(token)
            centralized(agent.run_once())
            agents.append(agent)
        world = SimpleNamespace(server=server, agents=agents)
        for version, tree in (("1", v1), ("2", v2)):
            admin(world, "layer", "capture", "--kind", "base", "--name", "corp",
                  "--version", version, "--from-dir", tree)
        admin(world, "assign", "--all", "--base", "corp:1")
        for agent in agents:
            assert agent.run_once()["update"]["state"] == "applied"  # nothing to switch
        admin(world, "collection", "create", "lab",
              *[x for a in agents for x in ("--endpoint", a.endpoint_id)])
        yield world
    finally:
        server.stop()
        server.kill()


def _states(world, tid: int) -> dict[int, str]:
    task = admin_json(world, "task", "show", str(tid))
    by_id = {e["endpoint"]: e["state"] for e in task["endpoints"]}
    return {i: by_id[a.endpoint_id] for i, a in enumerate(world.agents, 1)}


def test_a_mass_assignment_is_cancelled_then_retried_to_completion(world):
    a1, a2, a3 = world.agents
    tid = admin_json(world, "assign", "--collection", "lab", "--base", "corp:2")["task"]
    assert _states(world, tid) == {1: "assigned", 2: "assigned", 3: "assigned"}
    # Endpoint 1 starts: it downloads the update and waits for a restart to apply it.
    assert a1.run_once()["update"]["state"] == "ready"
    assert _states(world, tid)[1] == "ready"

    # Cancel asks first; without a terminal or --yes it changes nothing.
    proc = admin(world, "task", "cancel", str(tid), rc=2)
    assert "refusing without --yes" in proc.stderr
    assert _states(world, tid) == {1: "ready", 2: "assigned", 3: "assigned"}
    task = admin_json(world, "task", "cancel", str(tid), "--yes")
    assert task["state"] == "running" and task["counts"] == {"ready": 1, "cancelled": 2}

    # The cancelled endpoints keep their system: nothing to download or apply.
    for agent in (a2, a3):
        out = agent.run_once()
        assert out.get("update") is None, out
        assert (agent.root / "usr/bin/tool").read_bytes() == b"#!/bin/sh\necho v1\n"
    # The started one finishes.
    assert strata_json(*a1.cmd("apply"))["state"] == "applied"
    assert (a1.root / "usr/bin/tool").read_bytes() == b"#!/bin/sh\necho v2\n"
    a1.run_once()
    task = admin_json(world, "task", "show", str(tid))
    assert task["state"] == "cancelled" and task["counts"] == {"applied": 1, "cancelled": 2}

    # Retry: the cancelled endpoints are queued again and update like any other.
    task = admin_json(world, "task", "retry", str(tid))
    assert _states(world, tid) == {1: "applied", 2: "assigned", 3: "assigned"}
    for agent in (a2, a3):
        assert agent.run_once()["update"]["state"] == "ready"
        assert strata_json(*agent.cmd("apply"))["state"] == "applied"
        agent.run_once()
        assert (agent.root / "usr/lib/libnew.so").exists()
        assert (agent.root / "home").is_dir()  # user data untouched
    task = admin_json(world, "task", "show", str(tid))
    assert task["state"] == "done" and task["progress"] == 100.0
    assert {e["attempts"] for e in task["endpoints"]} == {1, 2}
    listed = admin(world, "task", "list").stdout
    assert f"{tid}" in listed and "done" in listed


def test_a_collection_is_reverted_to_its_pre_update_snapshots_as_a_task(world):
    """After the update above, the whole collection goes back to the system each endpoint
    had before it (signed per endpoint, one metadata version); user data as it is now."""
    for i, agent in enumerate(world.agents, 1):
        (agent.root / f"home/user{i}/today.txt").write_text("written after the update\n")
        centralized(agent.backup())
    proc = admin(world, "task", "revert", "--collection", "lab", rc=2)
    assert "refusing without --yes" in proc.stderr
    task = admin_json(world, "task", "revert", "--collection", "lab", "--yes")
    assert task["kind"] == "revert" and task["size"] == 3 and task["signed"]
    for agent in world.agents:
        assert agent.run_once()["update"]["state"] == "ready"
        assert strata_json(*agent.cmd("apply"))["state"] == "applied"
        agent.run_once()
    for i, agent in enumerate(world.agents, 1):
        assert (agent.root / "usr/bin/tool").read_bytes() == b"#!/bin/sh\necho v1\n"
        assert not (agent.root / "usr/lib/libnew.so").exists()
        assert (agent.root / f"home/user{i}/today.txt").exists()
    task = admin_json(world, "task", "show", str(task["id"]))
    assert task["state"] == "done", task

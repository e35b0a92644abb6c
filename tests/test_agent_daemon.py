"""The agent as a person expects it to behave, through the real `strata agent` command
against a real server: it waits for approval, does owed work as soon as the server is
back, says plainly that its access was revoked and stops, refuses to enroll twice
without --force, finds nothing to apply without failing, and finishes an apply that was
killed midway. Exit codes are the documented ones (README, docs/centralization.md)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server_fixtures import (
    Agent,
    Server,
    argv,
    centralized,
    cli_env,
    finish,
    kill_group,
    running_server,
    spawn,
    strata,
    strata_json,
    write_random,
)
from test_layers import USER_LAYERS, tree_state, under, without

pytestmark = pytest.mark.e2e

PENDING_APPROVAL, ACCESS_DENIED, UNREACHABLE = 4, 5, 3


@pytest.fixture
def server(tmp_path: Path):
    yield from running_server(tmp_path / "server-data")


def small_endpoint(server: Server, base: Path, name: str = "laptop", *,
                   token: str | None = None) -> Agent:
    root = base / f"{name}-root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text(name + "\n")
    write_random(root / "home/user/work.bin", 50_000, random.Random(name))
    agent = Agent(server, root, base / f"{name}-state")
    agent.enroll(token or server.create_token())
    return agent


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# -- approval --------------------------------------------------------------------------------


def test_run_once_while_waiting_for_approval_says_so_and_exits_4(server, tmp_path):
    token = server.create_token(require_approval=True)
    agent = small_endpoint(server, tmp_path, token=token)
    proc = strata(*agent.cmd("run", "--once"), rc=PENDING_APPROVAL)
    line = one_line(proc.stderr)
    assert "waiting for an administrator's approval" in line and agent.endpoint_id in line
    doc = json.loads(strata(*agent.cmd("run", "--once", "--json"), rc=PENDING_APPROVAL).stdout)
    assert doc["access"] == "pending" and doc["checked_in"] is False, doc
    status = agent.status()
    assert status["access"] == "pending" and status["server_reachable"] is True, status

    server.admin_cli("endpoint", "approve", agent.endpoint_id)
    assert centralized(agent.run_once())["kind"] == "centralize"
    assert agent.status()["access"] == "ok"


# -- owed work -------------------------------------------------------------------------------


def test_backup_owed_offline_is_done_as_soon_as_the_server_is_back(server, tmp_path):
    agent = small_endpoint(server, tmp_path)
    centralized(agent.run_once())
    (agent.root / "home/user/new-report.txt").write_text("written on the train\n")
    server.stop()
    proc = strata(*agent.cmd("backup"), rc=UNREACHABLE)
    assert "will retry" in proc.stderr
    assert agent.status()["pending_work"] == ["centralize"]

    server.start()
    out = agent.run_once()  # within the interval: only the owed backup makes it due
    r = centralized(out)
    assert r["kind"] == "incremental" and r["files_changed"] >= 1, r
    status = agent.status()
    assert status["pending_work"] == [] and status["server_reachable"] is True
    assert status["last_centralization"]["snapshot"] == r["snapshot"]
    assert not agent.run_once()["centralized"]  # paid: nothing owed any more


# -- revocation ------------------------------------------------------------------------------


def test_revoked_endpoint_is_said_plainly_and_the_daemon_stops(server, tmp_path):
    agent = small_endpoint(server, tmp_path)
    centralized(agent.run_once())
    server.admin_cli("endpoint", "revoke", agent.endpoint_id)

    status = agent.status()
    assert status["access"] == "revoked", status
    shown = strata(*agent.cmd("status")).stdout
    assert "revoked" in shown.lower() and "enroll" in shown, shown
    assert "(reachable)" not in shown and "pending: nothing" not in shown, shown

    proc = spawn(*agent.cmd("run", "--poll", "0.1"))  # the daemon, not --once
    try:
        rc, stdout, stderr = finish(proc, timeout=120)
    finally:
        kill_group(proc)
    assert rc == ACCESS_DENIED, (rc, stdout, stderr)
    line = one_line(stderr)
    assert line.startswith("error:") and "revoked" in line and "enroll" in line, line


# -- enrollment ------------------------------------------------------------------------------


def test_enroll_again_is_refused_without_force(server, tmp_path):
    agent = small_endpoint(server, tmp_path)
    first = agent.endpoint_id
    centralized(agent.run_once())
    proc = strata(*agent.enroll_cmd(server.create_token()), rc=2)
    line = one_line(proc.stderr)
    assert first in line and "--force" in line, line
    assert agent.endpoint_id == first
    assert [e["id"] for e in server.admin("GET", "/endpoints")] == [first]  # no orphan

    again = strata(*agent.enroll_cmd(server.create_token()), "--force")
    assert agent.endpoint_id != first
    assert first in again.stdout and "revoke" in again.stdout
    r = centralized(agent.run_once())
    assert r["kind"] == "centralize"  # the new endpoint starts its own CVD
    assert [s["id"] for s in agent.snapshots()] == [r["snapshot"]]
    # ... but the machine showed its old credential: nothing it had is sent again.
    assert r["chunks_uploaded"] == 0 and r["chunks_proven"] == 0, r


# -- apply -----------------------------------------------------------------------------------


def test_apply_with_nothing_to_apply_exits_0(server, tmp_path):
    agent = small_endpoint(server, tmp_path)
    centralized(agent.run_once())
    proc = strata(*agent.cmd("apply"))
    assert "nothing to apply" in proc.stdout
    assert strata_json(*agent.cmd("apply"))["state"] == "nothing-to-apply"


def make_base_pair(base: Path) -> tuple[Path, Path]:
    """Two small bases: v2 rewrites a third of v1, adds a package and drops some files."""
    rng = random.Random(11)
    v1 = base / "v1"
    for i in range(240):
        p = v1 / f"usr/lib/pkg{i % 12}/file{i}.dat"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(rng.randint(200, 4000)))
    v2 = base / "v2"
    shutil.copytree(v1, v2)
    for i in range(0, 240, 3):
        (v2 / f"usr/lib/pkg{i % 12}/file{i}.dat").write_bytes(rng.randbytes(1500))
    for i in range(60):
        p = v2 / f"usr/lib/newpkg/file{i}.dat"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(800))
    for i in range(1, 240, 10):
        (v2 / f"usr/lib/pkg{i % 12}/file{i}.dat").unlink()
    return v1, v2


@pytest.fixture
def ready_update(server, tmp_path):
    """An endpoint on base os:1 whose update to os:2 is downloaded and ready."""
    v1, v2 = make_base_pair(tmp_path)
    root = tmp_path / "endpoint"
    shutil.copytree(v1, root)
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("survivor\n")
    (root / "home/ann").mkdir(parents=True)
    (root / "home/ann/notes.txt").write_text("mine\n")
    agent = Agent(server, root, tmp_path / "state")
    agent.enroll(server.create_token())
    centralized(agent.run_once())
    for name, tree in (("1", v1), ("2", v2)):
        server.admin_cli("layer", "capture", "--kind", "base", "--name", "os", "--version",
                         name, "--from-dir", tree)
    server.admin_cli("assign", "--all", "--base", "os:1")
    assert agent.run_once()["update"]["state"] == "applied"
    server.admin_cli("assign", "--all", "--base", "os:2")
    assert agent.run_once()["update"]["state"] == "ready"
    return agent, v1, v2


# Runs `strata ARGS` in a process that SIGKILLs itself at the n-th journal step whose label
# starts with a given word ("stage", "rename"): a power cut at an exact point of the apply.
KILLED_AT = """
import os, signal, sys
import strata.layers.apply.crashpoints as journal
from strata.cli.main import main
word, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
seen = [0]
def hook(label):
    if label.split(" ")[0] == word:
        seen[0] += 1
        if seen[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
journal.crash_hook = hook
sys.argv = ["strata", *args]
main()
"""


def kill_apply_at(agent: Agent, word: str, n: int) -> None:
    args = [str(a) for a in argv(agent.cmd("apply"))[1:]]
    proc = subprocess.run([sys.executable, "-c", KILLED_AT, word, str(n), *args],
                          env=cli_env(), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.parametrize(("word", "recovered"), [("rename", "completed"),
                                                 ("stage", "discarded")])
def test_run_once_finishes_an_apply_killed_midway(server, ready_update, word, recovered):
    """Killed while switching (the journal rolls forward) or while staging (the staging
    is discarded): the next `agent run` recovers the tree, then carries on with the update
    it belonged to, as `agent apply` would."""
    agent, _, v2 = ready_update
    mine = under(tree_state(agent.root), *USER_LAYERS)
    kill_apply_at(agent, word, 20)
    assert agent.status()["layer_update"]["state"] == "applying"

    out = agent.run_once()
    assert agent.status()["layer_update"]["state"] == "applied", out
    assert out["update"]["state"] == "applied" and out["recovered"] == recovered, out
    now = tree_state(agent.root)
    assert without(now, *USER_LAYERS, "etc") == without(tree_state(v2), *USER_LAYERS, "etc")
    assert under(now, *USER_LAYERS) == mine
    shown = server.admin("GET", f"/endpoints/{agent.endpoint_id}")
    assert shown["layers"]["state"] == "applied", shown["layers"]
    triggers = [s["trigger"] for s in agent.snapshots()]
    assert triggers.count("pre-update") == 1, triggers  # taken once, not again on resume
    assert triggers[-1] == "post-update", triggers  # the new tree is centralized
    assert agent.run_once()["centralized"] is False  # and nothing is left owed

"""Commands that wipe or delete files on an endpoint, or delete data on the server, ask
first and show what will be lost; `--yes` answers for scripts; without a terminal and
without `--yes` they refuse in one line and change nothing.
"""

from __future__ import annotations

import io
import json

import pytest
import typer

from server_fixtures import (
    Agent,
    assert_one_line_error,
    centralized,
    running_server,
    strata,
)
from strata.cli import confirm as confirm_mod
from strata.cli.confirm import NotConfirmed, confirm


def test_yes_goes_ahead_without_asking(monkeypatch):
    monkeypatch.setattr(confirm_mod.sys, "stdin", io.StringIO(""))  # not a terminal
    confirm("wipe everything", ["all of it"], yes=True)


def test_no_terminal_refuses(monkeypatch):
    monkeypatch.setattr(confirm_mod.sys, "stdin", io.StringIO(""))
    with pytest.raises(NotConfirmed, match="wipe everything: refusing without --yes"):
        confirm("wipe everything", ["all of it"], yes=False)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "goes_ahead"), [("y\n", True), ("n\n", False),
                                                     ("\n", False)])
def test_a_terminal_shows_the_losses_and_asks(monkeypatch, capsys, answer, goes_ahead):
    monkeypatch.setattr(confirm_mod.sys, "stdin", Tty(answer))
    asked: list[str] = []

    def fake_confirm(text: str, default: bool, err: bool) -> bool:
        asked.append(text)
        assert default is False and err  # the safe answer is the default, on stderr
        return answer.strip() == "y"
    monkeypatch.setattr(typer, "confirm", fake_confirm)
    losses = [f"file {i}" for i in range(25)]
    if goes_ahead:
        confirm("wipe everything", losses, yes=False)
    else:
        with pytest.raises(NotConfirmed, match="cancelled: nothing was changed"):
            confirm("wipe everything", losses, yes=False)
    err = capsys.readouterr().err
    assert "wipe everything:" in err and "file 19" in err and "file 20" not in err
    assert "and 5 more" in err and asked == ["Go ahead?"]


# -- each command, against a real server ----------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("confirm")
    for server in running_server(base / "server"):
        agents = []
        for name in ("old", "new"):
            root = base / name
            (root / "home/ann").mkdir(parents=True)
            (root / "home/ann/doc.txt").write_text(f"{name}\n")
            (root / "etc").mkdir()
            (root / "etc/hostname").write_text(f"{name}\n")
            agent = Agent(server, root, base / f"state-{name}")
            agent.enroll(server.create_token())
            centralized(agent.run_once())
            agents.append(agent)
        ref = base / "ref"
        (ref / "usr/bin").mkdir(parents=True)
        (ref / "usr/bin/tool").write_text("tool\n")
        server.admin_cli("layer", "capture", "--kind", "base", "--name", "corp", "--version",
                         "1", "--from-dir", ref)
        yield server, agents


def unchanged(server, agents) -> None:
    """Nothing was assigned, revoked or deleted."""
    for a in agents:
        doc = server.admin("GET", f"/endpoints/{a.endpoint_id}")
        assert doc["state"] == "active" and doc["layers"] is None, doc  # type: ignore[index]
    assert [r["ref"] for r in server.admin("GET", "/layers")] == ["corp:1"]  # type: ignore[union-attr]


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["provision", "revert", "restore", "layer-delete",
                                     "endpoint-delete"])
def test_without_yes_and_no_terminal_it_refuses_in_one_line(world, command):
    server, (old, new) = world
    snap = old.snapshots()[0]["id"]
    args, words = {
        "provision": (["endpoint", "provision", old.endpoint_id, "--base", "corp:1"],
                      "provision old"),
        "revert": (["endpoint", "revert", old.endpoint_id, "--snapshot", snap[:8]],
                   f"revert old ({old.endpoint_id[:8]}) to snapshot {snap[:8]}"),
        "restore": (["endpoint", "restore", old.endpoint_id, "--to-endpoint",
                     new.endpoint_id], "restore the CVD of old"),
        "layer-delete": (["layer", "delete", "corp:1"], "delete layer corp:1"),
        "endpoint-delete": (["endpoint", "delete", new.endpoint_id],
                            f"delete endpoint new ({new.endpoint_id[:8]}) and its CVD"),
    }[command]
    proc = server.admin_cli(*args, rc=None)
    assert_one_line_error(proc, words, "refusing without --yes")
    unchanged(server, [old, new])


@pytest.mark.e2e
def test_revert_to_a_snapshot_the_endpoint_lacks_is_refused_before_asking(world):
    server, (old, _) = world
    proc = server.admin_cli("endpoint", "revert", old.endpoint_id, "--snapshot", "ffffffff",
                            rc=None)
    assert_one_line_error(proc, "has no snapshot 'ffffffff'", rc=2)


@pytest.mark.e2e
def test_with_yes_it_goes_ahead(world):
    server, (old, _) = world
    doc = json.loads(server.admin_cli("endpoint", "provision", old.endpoint_id, "--base",
                                      "corp:1", "--yes", "--json").stdout)
    assert doc["state"] == "assigned" and doc["endpoint"] == old.endpoint_id


@pytest.mark.e2e
def test_endpoint_delete_takes_the_cvd_and_the_credential(world, tmp_path):
    server, _ = world
    root = tmp_path / "orphan"
    (root / "home/bob").mkdir(parents=True)
    (root / "home/bob/notes.txt").write_text("orphaned\n")
    orphan = Agent(server, root, tmp_path / "state")
    orphan.enroll(server.create_token())
    centralized(orphan.run_once())
    sids = [s["id"] for s in orphan.snapshots()]
    assert all((server.store / "snapshots" / sid).exists() for sid in sids)
    server.admin_cli("collection", "create", "lab", "--endpoint", orphan.endpoint_id)

    doc = json.loads(server.admin_cli("endpoint", "delete", orphan.endpoint_id[:8], "--yes",
                                      "--json").stdout)
    assert doc == {"deleted": orphan.endpoint_id, "hostname": doc["hostname"],
                   "snapshots": len(sids)}
    ids = [e["id"] for e in server.admin("GET", "/endpoints")]  # type: ignore[union-attr]
    assert orphan.endpoint_id not in ids
    assert not any((server.store / "snapshots" / sid).exists() for sid in sids)
    members = server.admin("GET", "/collections")[0]["members"]  # type: ignore[index]
    assert orphan.endpoint_id not in members
    # Its agent is told its credential is unknown (exit 5), and stops.
    proc = strata(*orphan.cmd("run", "--once"), rc=5)
    assert "enroll" in proc.stderr
    actions = [a["action"] for a in server.admin("GET", "/audit?limit=5")]  # type: ignore[union-attr]
    assert "delete-endpoint" in actions

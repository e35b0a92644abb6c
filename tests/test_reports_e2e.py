"""Reports with a real server and agents: each agent reads its tree's dpkg status file at
check-in and sends the list once (not again while it is unchanged); `strata report
software` finds which endpoints have a package at which version, `strata report storage`
shows each CVD's logical and unique bytes; tables, --csv and --json."""

from __future__ import annotations

import csv
import io
import json

import pytest

from server_fixtures import (
    Agent,
    Server,
    centralized,
    device,
    enroll_request,
    strata,
    write_random,
)

pytestmark = pytest.mark.e2e

STATUS = """\
Package: openssl
Status: install ok installed
Architecture: amd64
Version: {openssl}

Package: bash
Status: install ok installed
Architecture: amd64
Version: 5.2.15-2+b7
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    import random

    base = tmp_path_factory.mktemp("reports")
    server = Server(base / "server", signing=False).start()
    try:
        token = server.create_token(uses=None)
        agents = []
        for i, openssl in enumerate(("3.0.15-1~deb12u1", "3.0.11-1~deb12u2"), 1):
            root = base / f"endpoint-{i}"
            (root / "var/lib/dpkg").mkdir(parents=True)
            (root / "var/lib/dpkg/status").write_text(STATUS.format(openssl=openssl))
            (root / "etc").mkdir()
            (root / "etc/hostname").write_text(f"desk-{i}\n")
            write_random(root / "usr/lib/libshared.so", 400_000, random.Random(99))
            write_random(root / f"home/user{i}/thesis.odt", 300_000, random.Random(i))
            agent = Agent(server, root, base / f"state-{i}")
            agent.enroll(token)
            centralized(agent.run_once())
            agents.append(agent)
        yield server, agents
    finally:
        server.stop()
        server.kill()


def _report(server: Server, *args: str) -> str:
    return server.admin_cli("report", *args).stdout


def test_agents_send_their_package_lists_and_the_fleet_report_finds_a_package(world):
    server, agents = world
    doc = json.loads(_report(server, "software", "--package", "openssl", "--json"))
    assert {r["version"] for r in doc["rows"]} == {"3.0.15-1~deb12u1", "3.0.11-1~deb12u2"}
    assert doc["reporting"] == 2
    rows = list(csv.reader(io.StringIO(_report(server, "software", "--package", "openssl",
                                               "--csv"))))
    assert rows[0] == ["endpoint", "hostname", "package", "version", "arch", "manager"]
    assert len(rows) == 3 and {r[5] for r in rows[1:]} == {"dpkg"}
    table = _report(server, "software")
    assert "openssl" in table and "bash" in table and "2 endpoint(s)" in table
    one = json.loads(_report(server, "software", "--endpoint", agents[0].endpoint_id[:8],
                             "--json"))
    assert sorted(r["name"] for r in one["rows"]) == ["bash", "openssl"]
    # Unchanged, the list is not sent again at the next check-in.
    sent = json.loads((agents[0].state / "status.json").read_text())["software"]
    agents[0].run_once()
    assert json.loads((agents[0].state / "status.json").read_text())["software"] == sent
    proc = server.admin_cli("report", "software", "--csv", "--json", rc=2)
    assert "not both" in proc.stderr


def test_storage_report_per_cvd(world):
    server, agents = world
    doc = json.loads(_report(server, "storage", "--json"))
    by_id = {c["endpoint"]: c for c in doc["cvds"]}
    for agent in agents:
        row = by_id[agent.endpoint_id]
        assert row["snapshots"] >= 1 and row["logical_bytes"] >= 700_000
        # Its own thesis (300 kB of random bytes) is unique to it; the library is shared.
        assert 300_000 <= row["unique_bytes"] < 400_000, row
        assert 0 < row["share"] < 60
    rows = list(csv.reader(io.StringIO(_report(server, "storage", "--csv"))))
    assert rows[0][-1] == "share_percent" and len(rows) == 3
    assert "Share of store" in strata("report", "storage", "--server", server.url,
                                      "--admin-token-file", server.token_file).stdout



def test_a_hostile_hostname_reaches_the_terminal_without_control_characters(world):
    server, _ = world
    resp = enroll_request(server, server.create_token(), "evil\x1b]0;owned\x07\x1b[31m\nrow")
    assert resp.status_code == 200, resp.text
    with device(server, resp.json()["credential"]) as http:
        sent = http.post("/api/v1/agent/software", json={"packages": [
            {"name": "openssl", "version": "0.9.8", "arch": "amd64", "manager": "dpkg"}]})
        assert sent.status_code == 200, sent.text
    for fmt in ("--csv", None):
        out = _report(server, "software", "--package", "openssl", *([fmt] if fmt else []))
        assert "\x1b" not in out and "\x07" not in out, out
        assert "evil" in out and "0.9.8" in out

"""`strata agent portal-password`: an end user sets their own file portal password
through their endpoint's agent credential. The account is on that endpoint only, its
folder is user data there, another endpoint's account of the same name is refused, a new
password ends the old sessions, and an endpoint cannot keep the server hashing."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from server_fixtures import Agent, Server, strata, strata_json, write_documents
from strata.server.app import create_app
from strata.server.context import ServerSettings
from strata.server.services import portal_self

ADMIN = "/api/v1/admin"
PASSWORD = "correct horse battery"


@pytest.fixture()
def fleet(tmp_path: Path) -> Iterator[SimpleNamespace]:
    app = create_app(ServerSettings(data_dir=tmp_path / "data"))
    token = (tmp_path / "data/admin.token").read_text().strip()
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        devices = {}
        for host in ("laptop-1", "laptop-2"):
            tok = client.post(f"{ADMIN}/tokens", json={"uses": 1}).json()["token"]
            resp = client.post("/api/v1/agent/enroll", headers={"Authorization": ""},
                               json={"token": tok, "hostname": host, "os": "debian"})
            devices[host] = (resp.json()["endpoint_id"], resp.json()["credential"])
        yield SimpleNamespace(app=app, client=client, devices=devices)


def _set(f: SimpleNamespace, host: str, name: str, password: str = PASSWORD,
         home: str = "") -> object:
    return f.client.post("/api/v1/agent/portal-password",
                         headers={"Authorization": f"Bearer {f.devices[host][1]}"},
                         json={"name": name, "password": password, "home": home})


def _portal_sign_in(app: object, name: str, password: str = PASSWORD) -> TestClient:
    c = TestClient(app)  # type: ignore[arg-type]
    csrf = re.search(r'name="csrf" value="([^"]+)"', c.get("/portal/login").text)
    assert csrf
    resp = c.post("/portal/login", data={"name": name, "password": password,
                                         "csrf": csrf.group(1)}, follow_redirects=False)
    c.status = resp.status_code  # type: ignore[attr-defined]
    return c


def test_an_end_user_sets_their_own_portal_password_on_their_own_endpoint(fleet):
    resp = _set(fleet, "laptop-1", "alice")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"name": "alice", "home": "home/alice", "created": True}
    accounts = fleet.client.get(f"{ADMIN}/portal-accounts").json()
    assert [(a["name"], a["endpoint"]) for a in accounts] == \
        [("alice", fleet.devices["laptop-1"][0])]
    assert _portal_sign_in(fleet.app, "alice").status == 303
    log = fleet.client.get(f"{ADMIN}/audit").json()
    mine = [e for e in log if e["action"] == "set-portal-password"]
    assert [(e["actor"], e["target"]) for e in mine] == \
        [(f"endpoint:{fleet.devices['laptop-1'][0]}", "alice")]


def test_another_endpoint_cannot_take_over_or_reset_an_account(fleet):
    _set(fleet, "laptop-1", "alice")
    resp = _set(fleet, "laptop-2", "alice", password="attacker's new password")
    assert resp.status_code == 409 and "is taken" in resp.json()["detail"]
    assert _portal_sign_in(fleet.app, "alice").status == 303  # the old password still
    assert _portal_sign_in(fleet.app, "alice", "attacker's new password").status == 401
    accounts = fleet.client.get(f"{ADMIN}/portal-accounts").json()
    assert accounts[0]["endpoint"] == fleet.devices["laptop-1"][0]


def test_the_folder_must_be_user_data_on_the_endpoint(fleet):
    for home in ("etc", "home/../etc", "/", "usr/lib", "var/lib/dpkg"):
        resp = _set(fleet, "laptop-1", "bob", home=home)
        assert resp.status_code == 422, (home, resp.text)
    portal_self.CHANGES._buckets.clear()  # the refusals above spent this endpoint's budget
    assert _set(fleet, "laptop-1", "bob", home="home/robert").json()["home"] == "home/robert"


def test_a_new_password_ends_the_old_sessions(fleet):
    _set(fleet, "laptop-1", "carol")
    session = _portal_sign_in(fleet.app, "carol")
    assert session.get("/portal", follow_redirects=False).status_code == 200
    assert _set(fleet, "laptop-1", "carol", password="a brand new passphrase").status_code == 200
    assert session.get("/portal", follow_redirects=False).status_code == 303
    assert _portal_sign_in(fleet.app, "carol", "a brand new passphrase").status == 303


def test_an_endpoint_cannot_keep_the_server_hashing(fleet):
    portal_self.CHANGES._buckets.clear()
    codes = [_set(fleet, "laptop-2", "dave").status_code for _ in range(7)]
    assert codes[:5] == [200] * 5 and codes[5:] == [429, 429]
    resp = fleet.client.post("/api/v1/agent/portal-password", headers={"Authorization": ""},
                             json={"name": "dave", "password": PASSWORD})
    assert resp.status_code == 401


@pytest.mark.e2e
def test_the_agent_command_sets_the_password_and_the_user_reads_their_files(tmp_path):
    server = Server(tmp_path / "server", signing=False).start()
    try:
        root = tmp_path / "laptop"
        write_documents(root / "home/erin", seed=5, count=3, size=4096)
        agent = Agent(server, root, tmp_path / "state")
        agent.enroll(server.create_token())
        agent.backup()
        (tmp_path / "pw").write_text(PASSWORD + "\n")
        out = strata_json(*agent.cmd("portal-password", "--name", "erin", "--password-file",
                                     tmp_path / "pw"))
        assert out == {"name": "erin", "home": "home/erin", "created": True}
        proc = strata(*agent.cmd("portal-password", "--name", "Erin!", "--password-file",
                                 tmp_path / "pw"), rc=2)
        assert "not valid" in proc.stderr and proc.stderr.count("\n") == 1
        import httpx

        with httpx.Client(base_url=server.url, verify=server.verify) as http:
            csrf = re.search(r'name="csrf" value="([^"]+)"', http.get("/portal/login").text)
            assert csrf
            resp = http.post("/portal/login", data={"name": "erin", "password": PASSWORD,
                                                    "csrf": csrf.group(1)})
            assert resp.status_code == 303
            sid = agent.snapshots()[-1]["id"]
            assert f'href="/portal/snapshots/{sid}"' in http.get("/portal").text
            files = http.get(f"/portal/snapshots/{sid}").text
            assert "doc-000.txt" in files and "doc-002.txt" in files
    finally:
        server.stop()
        server.kill()

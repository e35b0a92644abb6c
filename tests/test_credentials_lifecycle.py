"""Credentials have a life cycle: enrollment tokens are listed and revoked, the admin token
rotates without a restart, device credentials rotate at check-in and expire when not
renewed, secrets stay out of argv, and /metrics needs a token (or its own address)."""

from __future__ import annotations

import json
import sqlite3
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

import web
from server_fixtures import (
    Server,
    assert_one_line_error,
    enroll_request,
    free_port,
    strata,
)
from strata.server.catalog.db import alembic_config, catalog_url, create_catalog_engine

pytestmark = pytest.mark.e2e  # real servers and agents


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    # Rotation at every check-in, so the tests need not wait a week.
    srv = Server(tmp_path_factory.mktemp("creds") / "data", signing=False,
                 args=["--credential-rotation", "0s"]).start()
    yield srv  # type: ignore[misc]
    srv.stop()


def admin_json(srv: Server, *args: object) -> object:
    return json.loads(srv.admin_cli(*args, "--json", sign=False).stdout)


# -- enrollment tokens ----------------------------------------------------------------------


def test_tokens_are_listed_without_secrets_and_revoked(server: Server) -> None:
    leaked = server.create_token(uses=None, expires=None)  # --uses 0 --expires never
    kept = server.create_token()
    listed = admin_json(server, "token", "list")
    assert isinstance(listed, list)
    ids = {t["id"]: t for t in listed}
    assert leaked not in json.dumps(listed) and kept not in json.dumps(listed)
    leaked_id = max(ids) - 1
    assert ids[leaked_id]["uses_left"] is None and ids[leaked_id]["expires_at"] is None

    server.admin_cli("token", "revoke", str(leaked_id), sign=False)
    assert leaked_id not in {t["id"] for t in admin_json(server, "token", "list")}  # type: ignore[union-attr]
    everything = {t["id"]: t for t in admin_json(server, "token", "list", "--all")}  # type: ignore[union-attr]
    assert everything[leaked_id]["status"] == "revoked"
    resp = enroll_request(server, leaked)
    assert resp.status_code == 401 and "revoked" in resp.json()["detail"]
    assert enroll_request(server, kept).status_code == 200  # the others still enroll

    proc = server.admin_cli("token", "revoke", "99999", rc=2, sign=False)
    assert_one_line_error(proc, "no enrollment token 99999")


# -- the admin token ------------------------------------------------------------------------


def test_admin_token_rotates_at_once(server: Server, tmp_path: Path) -> None:
    mine = tmp_path / "admin.token"
    mine.write_text(server.admin_token + "\n")
    old = server.admin_token
    out = strata("admin-token", "rotate", "--server", server.url, "--admin-token-file", mine)
    new = mine.read_text().strip()
    assert new != old and new.startswith("sadm_") and new not in out.stdout
    assert stat.S_IMODE(mine.stat().st_mode) == 0o600
    assert server.admin_token == new  # the server's own copy (DATA/admin.token)
    headers = {"Authorization": f"Bearer {old}"}
    refused = web.get(server.url + "/api/v1/admin/endpoints", headers=headers)
    assert refused.status_code == 403
    assert strata("endpoint", "list", "--server", server.url, "--admin-token-file", mine)


# -- device credentials ---------------------------------------------------------------------


def _agent(server: Server, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    (root / "home/u").mkdir(parents=True)
    (root / "home/u/notes.txt").write_text("notes\n")
    token = tmp_path / "token"
    token.write_text(server.create_token() + "\n")
    state = tmp_path / "state"
    strata("agent", "enroll", "--server", server.url, "--token-file", token, "--root", root,
           "--state", state)
    return root, state


def _credential(state: Path) -> str:
    return json.loads((state / "credential.json").read_text())["credential"]


def _works(server: Server, credential: str) -> int:
    return web.get(server.url + "/api/v1/agent/snapshots",
                   headers={"Authorization": f"Bearer {credential}"}).status_code


def test_device_credential_rotates_at_checkin(server: Server, tmp_path: Path) -> None:
    _, state = _agent(server, tmp_path)
    first = _credential(state)
    out = json.loads(strata("agent", "run", "--once", "--state", state, "--json").stdout)
    assert out["centralized"], out
    second = _credential(state)
    assert second != first
    assert stat.S_IMODE((state / "credential.json").stat().st_mode) == 0o600
    # The old one holds until the agent has used the new one at a check-in.
    assert _works(server, first) == 200
    strata("agent", "run", "--once", "--state", state)
    third = _credential(state)
    assert third != second
    assert _works(server, first) == 401
    assert _works(server, third) == 200


def test_a_lost_rotation_answer_locks_nobody_out(server: Server, tmp_path: Path) -> None:
    _, state = _agent(server, tmp_path)
    held = _credential(state)
    # A check-in whose answer (with the new credential) never reaches the agent.
    lost = web.post(server.url + "/api/v1/agent/checkin",
                    json={"inventory": {"hostname": "h", "os": "linux"}},
                    headers={"Authorization": f"Bearer {held}"})
    assert lost.status_code == 200 and lost.json()["credential"]
    out = json.loads(strata("agent", "backup", "--state", state, "--json").stdout)
    assert out["centralized"], out
    assert _credential(state) not in (held, lost.json()["credential"])


def test_agent_status_beside_the_daemon_never_rotates(server: Server, tmp_path: Path) -> None:
    """`agent status` probes with an empty check-in: were it to rotate, it and the
    daemon could each keep a different new credential and lock the endpoint out."""
    _, state = _agent(server, tmp_path)
    held = _credential(state)
    strata("agent", "status", "--state", state)
    assert _credential(state) == held
    probe = web.post(server.url + "/api/v1/agent/checkin", json={},
                     headers={"Authorization": f"Bearer {held}"})
    assert probe.status_code == 200 and probe.json()["credential"] is None


def test_an_expired_credential_is_refused_in_one_line(tmp_path: Path) -> None:
    srv = Server(tmp_path / "data", signing=False).start()
    try:
        _, state = _agent(srv, tmp_path)
        strata("agent", "backup", "--state", state)
    finally:
        srv.stop()
    with sqlite3.connect(srv.data / "catalog.sqlite") as db:  # 200 days without a check-in
        db.execute("UPDATE endpoints SET credential_issued_at = ?",
                   ((datetime.now(UTC) - timedelta(days=200)).isoformat(),))
    srv.start()
    try:
        proc = strata("agent", "backup", "--state", state, rc=5)
        assert "credential expired" in proc.stderr and "enroll" in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") == 0, proc.stderr
    finally:
        srv.stop()


def test_catalog_with_endpoints_upgrades(tmp_path: Path) -> None:
    """Rotation adds columns to `endpoints`, which other tables point to: an existing
    catalog with endpoints upgrades in place."""
    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    engine = create_catalog_engine(catalog_url(url))
    from alembic import command

    def alembic(action: str, revision: str) -> None:
        with engine.begin() as conn:
            cfg = alembic_config(catalog_url(url))
            cfg.attributes["connection"] = conn
            getattr(command, action)(cfg, revision)
    try:
        alembic("upgrade", "0003")
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO endpoints (id, hostname, os, state, credential_hash, enrolled_at,"
                " last_ip, inventory, bytes_received, bytes_sent, tags) VALUES ('ep', 'h', "
                "'linux', 'active', 'c', :now, '', '{}', 0, 0, '[]')"),
                {"now": datetime.now(UTC)})
            conn.execute(text("INSERT INTO cvds (endpoint_id, created_at) VALUES ('ep', :now)"),
                         {"now": datetime.now(UTC)})
        alembic("upgrade", "head")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT credential_issued_at FROM endpoints")).scalar() \
                is None  # rotated at its next check-in, never expired by the upgrade
    finally:
        engine.dispose()


# -- secrets out of argv --------------------------------------------------------------------


def test_enrollment_token_never_needs_argv(server: Server, tmp_path: Path) -> None:
    proc = strata("agent", "enroll", "--server", server.url, "--root", tmp_path,
                  "--state", tmp_path / "state", rc=2)
    assert_one_line_error(proc, "no enrollment token", "--token-file")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    proc = strata("agent", "enroll", "--server", server.url, "--token-file", empty,
                  "--root", tmp_path, "--state", tmp_path / "state", rc=2)
    assert_one_line_error(proc, "is empty")
    proc = strata("agent", "enroll", "--server", server.url, "--root", tmp_path,
                  "--state", tmp_path / "state", env={"STRATA_ENROLL_TOKEN": "senr_nope"},
                  rc=2)
    assert_one_line_error(proc, "unknown or revoked enrollment token")


# -- metrics --------------------------------------------------------------------------------


def test_metrics_need_a_token_or_their_own_address(tmp_path: Path) -> None:
    port = free_port()
    srv = Server(tmp_path / "data", signing=False,
                 args=["--metrics-listen", f"127.0.0.1:{port}"]).start()
    try:
        anonymous = web.get(srv.url + "/metrics")
        assert anonymous.status_code == 401
        token = (srv.data / "metrics.token").read_text().strip()
        assert stat.S_IMODE((srv.data / "metrics.token").stat().st_mode) == 0o600
        scraped = web.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {token}"})
        assert scraped.status_code == 200 and "strata_requests_total" in scraped.text
        device = web.get(srv.url + "/metrics", headers={"Authorization": "Bearer sdev_x"})
        assert device.status_code == 401
        own = web.get(f"http://127.0.0.1:{port}/metrics")
        assert own.status_code == 200 and "strata_requests_total" in own.text
    finally:
        srv.stop()

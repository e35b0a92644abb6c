"""Policies are edited safely: `policy set` merges a partial document over the current
one (`--replace` replaces), shows what changes (`policy diff`, `--dry-run`), `policy
reset` puts the default back; a retention change that would remove snapshots says how
many per endpoint (revert points apart) and asks first; recent revert points survive any
retention; every change is in the audit log with what changed.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from server_fixtures import Agent, assert_one_line_error, centralized, running_server
from strata.engine.backup import backup
from strata.server.app import create_app
from strata.server.catalog.models import Cvd, Endpoint, SnapshotRecord
from strata.server.context import ServerSettings
from strata.server.maintenance import run_maintenance
from strata.server.policies import (
    DEFAULTS,
    LINUX_EXCLUSIONS,
    merge_policy,
    policy_changes,
    validate_policy,
)


def test_a_partial_document_merges_key_by_key():
    merged = merge_policy(DEFAULTS["upload"], {"interval_seconds": 600})
    assert merged["interval_seconds"] == 600
    assert merged["exclusions"] == DEFAULTS["upload"]["exclusions"]
    only_windows = merge_policy(DEFAULTS["upload"], {"exclusions": {"windows": ["/x/"]}})
    assert only_windows["exclusions"] == {"linux": LINUX_EXCLUSIONS, "windows": ["/x/"]}
    assert merge_policy(DEFAULTS["retention"], {"hourly": 1}) == {
        "hourly": 1, "daily": 31, "monthly": 12}


def test_changes_name_each_key_and_list_item():
    after = merge_policy(DEFAULTS["upload"], {"interval_seconds": 600, "exclusions": {
        "linux": [p for p in LINUX_EXCLUSIONS if p != "/proc/"] + ["/srv/scratch/"]}})
    assert policy_changes(DEFAULTS["upload"], after) == [
        ("exclusions.linux", "/proc/", None), ("exclusions.linux", None, "/srv/scratch/"),
        ("interval_seconds", 3600, 600)]
    assert policy_changes({"hourly": 24}, {"hourly": 24, "last": 3}) == [("last", None, 3)]
    assert policy_changes(DEFAULTS["layers"], DEFAULTS["layers"]) == []


@pytest.mark.parametrize(("kind", "doc", "words"), [
    ("upload", {"interval": 600}, "unknown upload keys: interval"),
    ("upload", {"interval_seconds": "LOTS"}, "interval_seconds must be a whole number"),
    ("retention", {"hourly": "LOTS"}, "hourly must be a whole number, got 'LOTS'"),
    ("retention", {"hourly": 2, "revert_points_days": -1}, "revert_points_days"),
    ("retention", {"hourly": 1.5}, "hourly must be a whole number, got 1.5"),
    ("bandwidth", {"rules": "x"}, "rules must be a list of objects"),
    ("bandwidth", {"rules": ["x"]}, "rules must be a list of objects"),
    ("bandwidth", {"rules": [{"start": 5}]}, "rule 1: start must be a string"),
    ("bandwidth", {"rules": [{"start": "8am"}]}, "rule 1: start must be a time"),
    ("bandwidth", {"rules": [{"upload": 5}]}, "rule 1: unknown keys upload"),
])
def test_malformed_documents_say_what_is_wrong(kind, doc, words):
    with pytest.raises(ValueError, match=words):
        validate_policy(kind, doc)


# -- retention: what it removes, revert points kept ------------------------------------------


def test_recent_revert_points_survive_a_retention_cut(tmp_path):
    app = create_app(ServerSettings(data_dir=tmp_path / "data", maintenance_interval=3600))
    ctx = app.state.ctx
    src = tmp_path / "src"
    src.mkdir()
    with TestClient(app):
        with ctx.write() as db:
            db.add(Endpoint(id="ep-1", hostname="h", credential_hash="x" * 64))
            db.flush()
            db.add(Cvd(endpoint_id="ep-1"))
        with ctx.session() as db:
            cvd_id = db.scalar(select(Cvd.id))
        now = datetime.now(UTC)
        # Hourly snapshots over 10 hours; two are revert points (one of them 40 days old).
        triggers = {3: "pre-update", 5: "pre-update"}
        times = {i: now - timedelta(hours=10 - i) for i in range(10)}
        times[3] = now - timedelta(days=40)
        ids = {}
        for i in range(10):
            (src / "f").write_bytes(bytes([i]) * 1000)
            ids[i] = backup(ctx.store, src, host="ep-1", parent=False).snapshot
            with ctx.write() as db:
                db.add(SnapshotRecord(id=ids[i], cvd_id=cvd_id, time=times[i],
                                      trigger=triggers.get(i, "scheduled")))
        ctx.store.flush()
        client = TestClient(app)
        token = (tmp_path / "data/admin.token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        plan = client.post("/api/v1/admin/policies/retention/plan", headers=auth,
                           json={"document": {"last": 1}, "replace": True}).json()
        # The newest is kept, the recent revert point too; the 40-day-old one goes.
        assert plan["retention"] == [{"endpoint_id": "ep-1", "hostname": "h", "snapshots": 10,
                                      "removed": 8, "revert_points_removed": 1}]
        assert client.put("/api/v1/admin/policies/retention", headers=auth,
                          json={"last": 1}).status_code == 200
        summary = run_maintenance(ctx)
        with ctx.session() as db:
            kept = set(db.scalars(select(SnapshotRecord.id)))
    assert summary["snapshots_removed"] == 8
    assert summary["removed_per_endpoint"] == {"ep-1": 8}  # the audit log says where
    assert kept == {ids[9], ids[5]}


# -- the CLI against a real server -----------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("policies")
    for server in running_server(base / "server"):
        root = base / "endpoint"
        (root / "home/ann").mkdir(parents=True)
        agent = Agent(server, root, base / "state")
        agent.enroll(server.create_token())
        for i in range(3):
            (root / "home/ann/doc.txt").write_text(f"version {i}\n")
            centralized(agent.backup())
        yield server, agent, base


def doc_file(base: Path, name: str, doc: object) -> Path:
    path = base / name
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.e2e
def test_policy_set_merges_and_shows_the_change(world):
    server, _, base = world
    partial = doc_file(base, "interval.json", {"interval_seconds": 600})
    out = server.admin_cli("policy", "diff", "upload", partial).stdout
    assert "~ interval_seconds: 3600 -> 600" in out
    assert json.loads(server.admin_cli("policy", "show", "upload").stdout)[
        "interval_seconds"] == 3600  # diff stored nothing
    out = server.admin_cli("policy", "set", "upload", partial).stdout
    assert "~ interval_seconds: 3600 -> 600" in out and "stored policy upload" in out
    shown = json.loads(server.admin_cli("policy", "show", "upload").stdout)
    assert shown["interval_seconds"] == 600
    assert shown["exclusions"] == DEFAULTS["upload"]["exclusions"]  # not wiped

    whole = doc_file(base, "whole.json", {"interval_seconds": 900})
    out = server.admin_cli("policy", "set", "upload", whole, "--replace", "--dry-run").stdout
    assert '- exclusions.linux: ["/proc/"' in out
    assert json.loads(server.admin_cli("policy", "show", "upload").stdout) == shown

    # reset asks (no terminal, no --yes: refused), then puts the default back.
    proc = server.admin_cli("policy", "reset", "upload", rc=None)
    assert_one_line_error(proc, "reset policy upload to its default", "--yes")
    out = server.admin_cli("policy", "reset", "upload", "--yes").stdout
    assert "~ interval_seconds: 600 -> 3600" in out
    assert json.loads(server.admin_cli("policy", "show", "upload").stdout) == \
        DEFAULTS["upload"]

    actions = [(a["action"], a["target"], a["detail"].get("changes"))
               for a in server.admin("GET", "/audit?limit=20")  # type: ignore[union-attr]
               if a["action"] in ("set-policy", "reset-policy")]
    assert actions[0] == ("reset-policy", "upload", [
        {"key": "interval_seconds", "before": 600, "after": 3600}])
    assert actions[1] == ("set-policy", "upload", [
        {"key": "interval_seconds", "before": 3600, "after": 600}])


@pytest.mark.e2e
def test_a_retention_cut_says_what_it_removes_and_asks(world):
    server, agent, base = world
    cut = doc_file(base, "cut.json", {"hourly": 1})
    proc = server.admin_cli("policy", "set", "retention", cut, rc=None)
    # Of three snapshots in one hour, the newest is kept, and the oldest (restic's rule
    # while counts are left): one goes.
    assert_one_line_error(proc, "would remove 1 snapshot from 1 endpoint", "--yes")
    assert json.loads(server.admin_cli("policy", "show", "retention").stdout) == \
        DEFAULTS["retention"]

    out = server.admin_cli("policy", "set", "retention", cut, "--dry-run").stdout
    assert f"would remove from {agent.endpoint_id}" in out and "1 of 3 snapshots" in out
    plan = json.loads(server.admin_cli("policy", "diff", "retention", cut, "--json").stdout)
    assert plan["document"] == {"hourly": 1, "daily": 31, "monthly": 12}
    assert plan["retention"][0]["removed"] == 1

    server.admin_cli("policy", "set", "retention", cut, "--yes")
    assert json.loads(server.admin_cli("policy", "show", "retention").stdout) == {
        "hourly": 1, "daily": 31, "monthly": 12}


@pytest.mark.e2e
def test_a_malformed_document_is_one_line(world):
    server, _, base = world
    for doc in ({"rules": "x"}, {"rules": ["x"]}):  # were answered with a 500
        assert_one_line_error(server.admin_cli("policy", "set", "bandwidth", doc_file(
            base, "bw.json", doc), "--replace", rc=None), "invalid bandwidth policy",
            "rules must be a list of objects")
    bad = doc_file(base, "bad.json", {"hourly": "LOTS"})
    assert_one_line_error(server.admin_cli("policy", "set", "retention", bad, rc=None),
                          "hourly must be a whole number, got 'LOTS'")
    notjson = base / "not.json"
    notjson.write_text("{hourly")
    assert_one_line_error(server.admin_cli("policy", "set", "retention", notjson, rc=None),
                          "is not JSON")
    assert_one_line_error(server.admin_cli("policy", "set", "retention", base / "nope.json",
                                           rc=None), "cannot read")

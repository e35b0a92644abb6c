"""Two administrators editing one policy at once: each `policy set` is made against the
revision it showed (the plan's, or `--revision` from `policy show`/`diff`), and the server
refuses to store over a revision nobody reviewed, unless `--force`."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from server_fixtures import assert_one_line_error, running_server
from strata.model.admin import policy_revision
from strata.server.app import create_app
from strata.server.context import ServerSettings
from strata.server.policies import DEFAULTS

API = "/api/v1/admin/policies/retention"


def test_a_revision_names_the_content():
    assert policy_revision({"hourly": 24, "daily": 31}) == policy_revision(
        {"daily": 31, "hourly": 24})  # key order is not content
    assert policy_revision({"hourly": 24}) != policy_revision({"hourly": 23})
    assert len(policy_revision(DEFAULTS["retention"])) == 12


def test_a_write_over_a_revision_nobody_reviewed_is_refused(tmp_path):
    app = create_app(ServerSettings(data_dir=tmp_path / "data", maintenance_interval=3600))
    with TestClient(app) as client:
        token = (tmp_path / "data/admin.token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        shown = client.get(API, headers=auth)
        r0 = policy_revision(DEFAULTS["retention"])
        assert shown.headers["etag"] == f'"{r0}"'
        # Both admins plan against the default.
        for admin in ("a", "b"):
            plan = client.post(f"{API}/plan", headers=auth,
                               json={"document": {"daily": 7}}).json()
            assert plan["revision"] == r0, admin
        first = client.put(API, headers={**auth, "If-Match": f'"{r0}"'},
                           json={"hourly": 24, "daily": 7, "monthly": 12})
        assert first.status_code == 200
        second = client.put(API, headers={**auth, "If-Match": f'"{r0}"'},
                            json={"hourly": 2, "daily": 31, "monthly": 12})
        assert second.status_code == 409
        r1 = policy_revision(first.json())
        assert f"changed since revision {r0}" in second.json()["detail"]
        assert f"it is now revision {r1}" in second.json()["detail"]
        assert client.get(API, headers=auth).json()["daily"] == 7  # the first one stands
        # A reset is checked the same way; without If-Match (--force) the write goes.
        assert client.delete(API, headers={**auth, "If-Match": f'"{r0}"'}).status_code == 409
        assert client.put(API, headers=auth, json={"hourly": 3}).status_code == 200
        assert client.get(API, headers=auth).json() == {"hourly": 3}


@pytest.mark.e2e
def test_policy_set_refuses_a_revision_changed_since_it_was_shown(tmp_path):
    for server in running_server(tmp_path / "server"):
        shown = server.admin_cli("policy", "show", "retention")
        r0 = policy_revision(json.loads(shown.stdout))
        assert shown.stderr.strip() == f"policy retention, revision {r0}"
        mine = tmp_path / "mine.json"
        mine.write_text(json.dumps({"daily": 14}))
        theirs = tmp_path / "theirs.json"
        theirs.write_text(json.dumps({"monthly": 24}))
        diff = server.admin_cli("policy", "diff", "retention", mine).stdout
        assert f"policy retention (revision {r0}): 1 change" in diff
        # Meanwhile another administrator stores a change.
        server.admin_cli("policy", "set", "retention", theirs, "--yes")
        proc = server.admin_cli("policy", "set", "retention", mine, "--revision", r0, "--yes",
                                rc=None)
        assert_one_line_error(proc, f"changed since revision {r0}", "--force")
        assert json.loads(server.admin_cli("policy", "show", "retention").stdout) == {
            "hourly": 24, "daily": 31, "monthly": 24}  # theirs stands, untouched
        # Reviewed again (the plan shows their change kept), or forced: stored.
        server.admin_cli("policy", "set", "retention", mine, "--revision", r0, "--force",
                         "--yes")
        assert json.loads(server.admin_cli("policy", "show", "retention").stdout) == {
            "hourly": 24, "daily": 14, "monthly": 24}
        proc = server.admin_cli("policy", "reset", "retention", "--revision", r0, "--yes",
                                rc=None)
        assert_one_line_error(proc, f"changed since revision {r0}")

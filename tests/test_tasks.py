"""Tracked tasks: an assignment or migration over many endpoints is a task with each
endpoint's state; cancel skips the endpoints that have not started (their assignment goes
back) while those under way finish; retry queues the failed and cancelled ones again;
only a role that may start a task of that kind may cancel or retry it.

In-process server; the agents' progress reports go through the agent API with each
endpoint's own credential, as a real agent sends them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from signing_fixtures import init_signing_in_process
from strata.model.entry import Entry, EntryType
from strata.server.app import create_app
from strata.server.catalog.models import Assignment
from strata.server.context import ServerContext, ServerSettings
from strata.server.services.layers import save_layer

ADMIN = "/api/v1/admin"


@pytest.fixture()
def fleet(tmp_path: Path) -> Iterator[SimpleNamespace]:
    with _fleet(tmp_path) as f:
        yield f


@contextmanager
def _fleet(tmp_path: Path, catalog: str = "") -> Iterator[SimpleNamespace]:
    """Three enrolled endpoints in collection `lab`, base layers os:1 and os:2."""
    app = create_app(ServerSettings(data_dir=tmp_path / "data", catalog_url=catalog))
    ctx: ServerContext = app.state.ctx
    token = (tmp_path / "data/admin.token").read_text().strip()
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        init_signing_in_process(client, tmp_path / "keys")
        with ctx.write() as db:
            for v in ("1", "2"):
                save_layer(ctx, db, kind="base", name="os", version=v, family="linux",
                           entries=[Entry(path=b"usr", type=EntryType.DIR, mode=0o755),
                                    Entry(path=f"usr/v{v}".encode(), type=EntryType.DIR)])
        devices = {}
        for host in ("pc-1", "pc-2", "pc-3"):
            tok = client.post(f"{ADMIN}/tokens", json={"uses": 1}).json()["token"]
            resp = client.post("/api/v1/agent/enroll", headers={"Authorization": ""},
                               json={"token": tok, "hostname": host, "os": "debian"})
            devices[host] = (resp.json()["endpoint_id"], resp.json()["credential"])
        resp = client.post(f"{ADMIN}/collections", json={
            "name": "lab", "members": [eid for eid, _ in devices.values()]})
        assert resp.status_code == 200, resp.text
        for name, role in (("hana", "help-desk"), ("ivan", "image-manager")):
            client.post(f"{ADMIN}/users", json={"name": name, "role": role,
                                                 "password": "correct horse battery"})
        tokens = {name: client.post(f"{ADMIN}/users/{name}/tokens", json={}).json()["token"]
                  for name in ("hana", "ivan")}
        yield SimpleNamespace(ctx=ctx, client=client, devices=devices, tokens=tokens)


def _checkin(f: SimpleNamespace, host: str) -> dict:
    """The endpoint's check-in, with its own credential: its desired state."""
    resp = f.client.post("/api/v1/agent/checkin", json={},
                         headers={"Authorization": f"Bearer {f.devices[host][1]}"})
    assert resp.status_code == 200, resp.text
    return resp.json()["desired"]


def _report(f: SimpleNamespace, host: str, state: str, detail: str = "") -> None:
    key = _checkin(f, host)["key"]
    resp = f.client.post("/api/v1/agent/update",
                         headers={"Authorization": f"Bearer {f.devices[host][1]}"},
                         json={"key": key, "state": state, "detail": detail,
                               "percent": 100.0 if state == "applied" else 30.0})
    assert resp.status_code == 200, resp.text


def _states(task: dict) -> dict[str, str]:
    return {e["hostname"]: e["state"] for e in task["endpoints"]}


def _assign(f: SimpleNamespace, base: str) -> dict:
    resp = f.client.post(f"{ADMIN}/assign", json={"collection": "lab", "base": base})
    assert resp.status_code == 200, resp.text
    task_id = resp.json()["task"]
    return f.client.get(f"{ADMIN}/tasks/{task_id}").json()


def test_an_assignment_to_a_collection_is_a_task_with_each_endpoints_state(fleet):
    task = _assign(fleet, "os:1")
    assert task["kind"] == "assign" and task["size"] == 3
    assert _states(task) == {"pc-1": "assigned", "pc-2": "assigned", "pc-3": "assigned"}
    _report(fleet, "pc-1", "applied")
    _report(fleet, "pc-2", "downloading")
    task = fleet.client.get(f"{ADMIN}/tasks/{task['id']}").json()
    assert _states(task) == {"pc-1": "applied", "pc-2": "downloading", "pc-3": "assigned"}
    assert task["state"] == "running" and task["progress"] == pytest.approx(33.3)
    listed = fleet.client.get(f"{ADMIN}/tasks").json()
    assert listed[-1]["counts"] == {"applied": 1, "downloading": 1, "assigned": 1}
    assert listed[-1]["endpoints"] == []  # a list carries counts, not every endpoint


def test_cancel_skips_endpoints_not_started_and_puts_their_assignment_back(fleet):
    first = _assign(fleet, "os:1")
    for host in ("pc-1", "pc-2", "pc-3"):
        _report(fleet, host, "applied")
    before = {h: _checkin(fleet, h)["key"] for h in ("pc-1", "pc-3")}
    task = _assign(fleet, "os:2")
    assert _states(fleet.client.get(f"{ADMIN}/tasks/{first['id']}").json()) == \
        dict.fromkeys(("pc-1", "pc-2", "pc-3"), "superseded")
    _report(fleet, "pc-2", "downloading")  # pc-2 has started; pc-1 and pc-3 have not
    resp = fleet.client.post(f"{ADMIN}/tasks/{task['id']}/cancel")
    assert resp.status_code == 200, resp.text
    task = resp.json()
    assert _states(task) == {"pc-1": "cancelled", "pc-2": "downloading",
                             "pc-3": "cancelled"}
    assert task["state"] == "running"  # pc-2 finishes its update
    # The cancelled endpoints want what they had again, and have it: nothing to do.
    for host in ("pc-1", "pc-3"):
        desired = _checkin(fleet, host)
        assert desired["key"] == before[host]
        assert [dl["version"] for dl in desired["layers"]] == ["1"]
    with fleet.ctx.session() as db:
        a = db.get(Assignment, fleet.devices["pc-1"][0])
        assert a is not None and a.state == "applied" and a.task_id == first["id"]
    _report(fleet, "pc-2", "applied")
    task = fleet.client.get(f"{ADMIN}/tasks/{task['id']}").json()
    assert task["state"] == "cancelled" and task["counts"] == {"applied": 1, "cancelled": 2}
    log = fleet.client.get(f"{ADMIN}/audit").json()
    assert any(e["action"] == "cancel-task" and e["detail"]["cancelled"] == 2 for e in log)


def test_retry_queues_the_failed_and_cancelled_endpoints_again(fleet):
    task = _assign(fleet, "os:2")
    _report(fleet, "pc-1", "applied")
    _report(fleet, "pc-2", "failed", detail="not enough disk space")
    fleet.client.post(f"{ADMIN}/tasks/{task['id']}/cancel")
    task = fleet.client.get(f"{ADMIN}/tasks/{task['id']}").json()
    assert _states(task) == {"pc-1": "applied", "pc-2": "failed", "pc-3": "cancelled"}
    assert task["state"] == "failed"
    resp = fleet.client.post(f"{ADMIN}/tasks/{task['id']}/retry")
    assert resp.status_code == 200, resp.text
    task = resp.json()
    assert _states(task) == {"pc-1": "applied", "pc-2": "assigned", "pc-3": "assigned"}
    assert {e["hostname"]: e["attempts"] for e in task["endpoints"]} == \
        {"pc-1": 1, "pc-2": 2, "pc-3": 2}
    for host in ("pc-2", "pc-3"):
        assert [dl["version"] for dl in _checkin(fleet, host)["layers"]] == ["2"]
        _report(fleet, host, "applied")
    task = fleet.client.get(f"{ADMIN}/tasks/{task['id']}").json()
    assert task["state"] == "done" and task["progress"] == 100.0
    # Nothing left to retry: one plain refusal.
    resp = fleet.client.post(f"{ADMIN}/tasks/{task['id']}/retry")
    assert resp.status_code == 422 and "no failed or cancelled" in resp.json()["detail"]


def test_cancel_then_retry_then_cancel_again_puts_back_the_same_assignment(fleet):
    first = _assign(fleet, "os:1")
    for host in ("pc-1", "pc-2", "pc-3"):
        _report(fleet, host, "applied")
    task = _assign(fleet, "os:2")
    for _ in range(2):
        fleet.client.post(f"{ADMIN}/tasks/{task['id']}/cancel")
        fleet.client.post(f"{ADMIN}/tasks/{task['id']}/retry")
    fleet.client.post(f"{ADMIN}/tasks/{task['id']}/cancel")
    with fleet.ctx.session() as db:
        for eid, _ in fleet.devices.values():
            a = db.get(Assignment, eid)
            assert a is not None and (a.task_id, a.state) == (first["id"], "applied")


def test_only_a_role_that_may_start_the_kind_may_cancel_or_retry_it(fleet):
    task = _assign(fleet, "os:2")
    hana = {"Authorization": f"Bearer {fleet.tokens['hana']}"}
    ivan = {"Authorization": f"Bearer {fleet.tokens['ivan']}"}
    for verb in ("cancel", "retry"):
        resp = fleet.client.post(f"{ADMIN}/tasks/{task['id']}/{verb}", headers=hana)
        assert resp.status_code == 403, resp.text
        assert "needs the 'assign' permission" in resp.json()["detail"]
    assert fleet.client.get(f"{ADMIN}/tasks/{task['id']}", headers=hana).status_code == 200
    resp = fleet.client.post(f"{ADMIN}/tasks/{task['id']}/cancel", headers=ivan)
    assert resp.status_code == 200 and resp.json()["counts"] == {"cancelled": 3}
    assert fleet.client.post(f"{ADMIN}/tasks/424242/cancel").status_code == 404


def test_a_migration_is_cancelled_and_retried_like_an_assignment(fleet):
    resp = fleet.client.post(f"{ADMIN}/migrate", json={"collection": "lab", "base": "os:2"})
    assert resp.status_code == 200, resp.text
    tid = resp.json()["id"]
    _report(fleet, "pc-3", "applying")
    task = fleet.client.post(f"{ADMIN}/tasks/{tid}/cancel").json()
    assert _states(task) == {"pc-1": "cancelled", "pc-2": "cancelled", "pc-3": "applying"}
    task = fleet.client.post(f"{ADMIN}/tasks/{tid}/retry").json()
    assert _states(task) == {"pc-1": "assigned", "pc-2": "assigned", "pc-3": "applying"}
    assert task["params"]["base"] == "os:2"


def test_an_agent_drops_a_downloaded_update_the_server_no_longer_wants(tmp_path):
    """An agent that started just before a cancel (its first report came too late) does
    not apply the download at its next restart; one already applying carries on."""
    from strata.agent.state import AgentState
    from strata.agent.update import appliable, drop_unwanted
    from strata.model.update import UpdateState

    state = AgentState(tmp_path / "state")
    state.save_update({"key": "new", "state": UpdateState.READY, "desired": {}})
    drop_unwanted(state, "new")
    assert appliable(state.update())  # still wanted
    drop_unwanted(state, "old")
    assert not appliable(state.update()) and state.update()["state"] == "dropped"
    state.save_update({"key": "new", "state": UpdateState.APPLYING, "desired": {}})
    drop_unwanted(state, "old")
    assert state.update()["state"] == UpdateState.APPLYING


def _snapshot_rows(f: SimpleNamespace, host: str, triggers: list[str]) -> list[str]:
    """Catalog records of the endpoint's snapshots (what a mass revert chooses from)."""
    from datetime import UTC, datetime, timedelta

    from strata.server.catalog.models import SnapshotRecord
    from strata.server.services import snapshots

    eid = f.devices[host][0]
    ids = []
    with f.ctx.write() as db:
        cvd = snapshots.cvd_of(db, eid)
        assert cvd is not None
        for i, trigger in enumerate(triggers):
            sid = f"{eid[:8]}{i:056x}"
            db.add(SnapshotRecord(id=sid, cvd_id=cvd.id, trigger=trigger, layers=[],
                                  time=datetime(2026, 12, 1, tzinfo=UTC) + timedelta(hours=i)))
            ids.append(sid)
        cvd.last_snapshot = ids[-1]
    return ids


def test_a_revert_of_a_collection_is_a_task_each_to_its_own_snapshot(fleet):
    snaps = {h: _snapshot_rows(fleet, h, ["scheduled", "pre-update", "post-update"])
             for h in ("pc-1", "pc-2")}
    resp = fleet.client.post(f"{ADMIN}/tasks/revert", json={"collection": "lab"})
    assert resp.status_code == 409 and "pc-3 has no pre-update snapshot" in resp.text
    assert fleet.client.get(f"{ADMIN}/tasks").json() == []  # nothing was started
    resp = fleet.client.post(f"{ADMIN}/tasks/revert", json={
        "endpoints": [fleet.devices[h][0] for h in ("pc-1", "pc-2")]})
    assert resp.status_code == 200, resp.text
    task = resp.json()
    assert task["kind"] == "revert" and task["counts"] == {"assigned": 2}
    with fleet.ctx.session() as db:
        for h in ("pc-1", "pc-2"):
            a = db.get(Assignment, fleet.devices[h][0])
            assert a is not None and a.operation["snapshot"] == snaps[h][1]
    # The help desk may revert, so it may cancel a revert; not a provisioning.
    hana = {"Authorization": f"Bearer {fleet.tokens['hana']}"}
    resp = fleet.client.post(f"{ADMIN}/tasks/{task['id']}/cancel", headers=hana)
    assert resp.status_code == 200 and resp.json()["counts"] == {"cancelled": 2}
    with fleet.ctx.session() as db:  # they had no assignment before: none again
        assert all(db.get(Assignment, fleet.devices[h][0]) is None for h in ("pc-1", "pc-2"))
    resp = fleet.client.post(f"{ADMIN}/tasks/provision", json={"collection": "lab",
                                                                "base": "os:1"})
    assert resp.status_code == 200, resp.text
    tid = resp.json()["id"]
    assert resp.json()["kind"] == "provision" and resp.json()["size"] == 3
    resp = fleet.client.post(f"{ADMIN}/tasks/{tid}/cancel", headers=hana)
    assert resp.status_code == 403 and "'provision' permission" in resp.text


def test_an_endpoint_without_an_assignment_before_the_task_has_none_after_a_cancel(fleet):
    """An empty assignment is not "none" (drivers would follow the hardware): the row the
    task made goes, and a retry makes it again."""
    task = _assign(fleet, "os:1")
    fleet.client.post(f"{ADMIN}/tasks/{task['id']}/cancel")
    assert _checkin(fleet, "pc-1") is None
    with fleet.ctx.session() as db:
        assert db.get(Assignment, fleet.devices["pc-1"][0]) is None
    task = fleet.client.post(f"{ADMIN}/tasks/{task['id']}/retry").json()
    assert task["counts"] == {"assigned": 3}
    assert [dl["version"] for dl in _checkin(fleet, "pc-1")["layers"]] == ["1"]
    fleet.client.post(f"{ADMIN}/tasks/{task['id']}/cancel")
    assert _checkin(fleet, "pc-1") is None


def test_a_task_from_before_members_recorded_anything_is_not_cancelled(fleet):
    """Tasks migrated from an older catalog have members with nothing to put back: a
    cancel leaves them running rather than guess."""
    from strata.server.catalog.models import TaskMember

    task = _assign(fleet, "os:1")
    with fleet.ctx.write() as db:
        for m in db.query(TaskMember).filter_by(task_id=task["id"]):
            m.previous, m.target = {}, {}
    task = fleet.client.post(f"{ADMIN}/tasks/{task['id']}/cancel").json()
    assert task["counts"] == {"assigned": 3}


def test_cancel_and_retry_on_both_catalog_databases(catalogs, tmp_path):
    """The cancel locks the members' assignments (FOR UPDATE on PostgreSQL) and reads
    them back alike on both databases."""
    with _fleet(tmp_path, catalogs.url(tmp_path)) as f:
        task = _assign(f, "os:2")
        _report(f, "pc-1", "downloading")
        task = f.client.post(f"{ADMIN}/tasks/{task['id']}/cancel").json()
        assert task["counts"] == {"downloading": 1, "cancelled": 2}
        task = f.client.post(f"{ADMIN}/tasks/{task['id']}/retry").json()
        assert task["counts"] == {"downloading": 1, "assigned": 2}
        assert {e["attempts"] for e in task["endpoints"]} == {1, 2}
        listed = f.client.get(f"{ADMIN}/tasks").json()
        assert listed[-1]["counts"] == task["counts"]

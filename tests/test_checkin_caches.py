"""A fleet's check-ins are answered from caches: an inventory whose figures moved (free
disk space, in nearly every check-in of a real agent) is written with the next batch of
visits and reloads nothing; new hardware or a new name is written at once and recomputes
the desired state, as drivers and collections follow them."""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from strata.server import read_cache
from strata.server.app import create_app
from strata.server.catalog.models import Endpoint
from strata.server.context import ServerContext, ServerSettings
from strata.server.services.endpoints import delete_endpoint

INVENTORY = {"hostname": "h", "os": "debian", "hardware": {"vendor": "V", "model": "M"},
             "disks": [{"mount": "/", "total_bytes": 1000, "free_bytes": 500}]}


@pytest.fixture()
def fleet(tmp_path: Path) -> Iterator[tuple[TestClient, ServerContext, str, dict, list[str]]]:
    """A server with one endpoint that has checked in once (its caches warm), and the
    keys the cache loads from then on."""
    app = create_app(ServerSettings(data_dir=tmp_path / "data"))
    ctx: ServerContext = app.state.ctx
    admin = {"Authorization": f"Bearer {(tmp_path / 'data/admin.token').read_text().strip()}"}
    with TestClient(app) as client:
        tok = client.post("/api/v1/admin/tokens", json={"uses": 1}, headers=admin)
        body = client.post("/api/v1/agent/enroll", json={
            "token": tok.json()["token"], "hostname": "h", "os": "debian",
            "inventory": INVENTORY}).json()
        device = {"Authorization": f"Bearer {body['credential']}"}
        _checkin(client, device, INVENTORY)
        loads: list[str] = []
        read_cache.after_load_hook = loads.append
        try:
            yield client, ctx, body["endpoint_id"], device, loads
        finally:
            read_cache.after_load_hook = None


def _checkin(client: TestClient, device: dict, inventory: dict) -> None:
    resp = client.post("/api/v1/agent/checkin", json={"inventory": inventory, "status": {}},
                       headers=device)
    assert resp.status_code == 200, resp.text


def _stored(ctx: ServerContext, endpoint_id: str) -> dict:
    with ctx.session() as db:
        row = db.get(Endpoint, endpoint_id)
        assert row is not None
        return row.inventory


def _free(inventory: dict, free: int) -> dict:
    moved = copy.deepcopy(inventory)
    moved["disks"][0]["free_bytes"] = free
    return moved


def test_a_checkin_that_must_read_the_catalog_does_so_off_the_event_loop(fleet):
    """A catalog read on the event loop holds every other request behind it (with
    PostgreSQL, check-ins queued for seconds while the server idled): each load of a
    cold check-in runs in a worker thread, and the credential lookup brings the head and
    the (empty) desired state along, in one query."""
    client, ctx, eid, device, loads = fleet
    where: list[bool] = []

    def on_loop(key: str) -> None:
        loads.append(key)
        try:
            asyncio.get_running_loop()
            where.append(True)
        except RuntimeError:  # no loop runs in this thread: a worker
            where.append(False)
    read_cache.after_load_hook = on_loop
    ctx.invalidate()
    _checkin(client, device, INVENTORY)
    assert loads and not any(where), list(zip(loads, where, strict=True))
    assert not any(k.startswith(("last:", "desired:")) for k in loads), loads
    loads.clear()
    _checkin(client, device, _free(INVENTORY, 123))  # warm: served on the loop, no loads
    assert loads == []


def test_a_checkin_whose_free_space_moved_is_stored_in_a_batch_and_reloads_nothing(fleet):
    client, ctx, eid, device, loads = fleet
    _checkin(client, device, INVENTORY)
    assert loads == []  # warm: the whole check-in came from the caches
    _checkin(client, device, _free(INVENTORY, 400))
    _checkin(client, device, _free(INVENTORY, 300))
    assert loads == []
    assert _stored(ctx, eid)["disks"][0]["free_bytes"] == 500  # not yet: no write each
    ctx.flush_seen()  # what the server's flusher thread does every couple of seconds
    assert _stored(ctx, eid)["disks"][0]["free_bytes"] == 300


@pytest.mark.parametrize("change", ["hardware", "hostname", "os"])
def test_new_hardware_or_name_recomputes_the_desired_state(fleet, change):
    client, ctx, eid, device, loads = fleet
    moved = copy.deepcopy(INVENTORY)
    if change == "hardware":
        moved["hardware"]["model"] = "N"
    else:
        moved[change] = "windows" if change == "os" else "h2"
    _checkin(client, device, moved)
    assert f"desired:{eid}" in loads
    assert _stored(ctx, eid) == moved


def test_a_batched_inventory_never_overwrites_newer_hardware(fleet):
    client, ctx, eid, device, _ = fleet
    _checkin(client, device, _free(INVENTORY, 400))  # noted for the batch
    moved = _free(INVENTORY, 300)
    moved["hardware"]["model"] = "N"
    _checkin(client, device, moved)  # written at once
    ctx.flush_seen()
    assert _stored(ctx, eid) == moved


def test_an_inventory_the_catalog_cannot_hold_is_refused_before_the_batch(fleet):
    client, ctx, eid, device, _ = fleet
    bad = _free(INVENTORY, 0)
    bad["disks"][0]["free_bytes"] = float("nan")
    resp = client.post("/api/v1/agent/checkin", headers={**device,
                       "Content-Type": "application/json"},
                       content=json.dumps({"inventory": bad, "status": {}}))
    assert resp.status_code == 422 and "finite" in resp.json()["detail"]
    _checkin(client, device, _free(INVENTORY, 100))
    ctx.flush_seen()  # the batch was not poisoned
    assert _stored(ctx, eid)["disks"][0]["free_bytes"] == 100


def test_an_endpoint_forgotten_before_the_batch_does_not_lose_the_others(fleet, tmp_path):
    client, ctx, eid, device, _ = fleet
    admin = {"Authorization": f"Bearer {(tmp_path / 'data/admin.token').read_text().strip()}"}
    tok = client.post("/api/v1/admin/tokens", json={"uses": 1}, headers=admin).json()["token"]
    other = client.post("/api/v1/agent/enroll", json={"token": tok, "hostname": "h",
                                                      "os": "debian", "inventory": INVENTORY})
    other_device = {"Authorization": f"Bearer {other.json()['credential']}"}
    _checkin(client, other_device, _free(INVENTORY, 200))
    _checkin(client, device, _free(INVENTORY, 100))
    delete_endpoint(ctx, other.json()["endpoint_id"], actor="admin")
    ctx.flush_seen()
    assert _stored(ctx, eid)["disks"][0]["free_bytes"] == 100


def test_a_fresh_process_can_build_a_cached_record_before_any_other_orm_use():
    """A server restarted under a fleet gets a check-in first: the credential lookup
    builds the endpoint's record before any query or constructor configured the ORM's
    mappings (it failed with AttributeError until it configured them itself)."""
    code = ("from sqlalchemy.orm import make_transient_to_detached\n"
            "from strata.server.services.credentials import _endpoint_factory\n"
            "ep = _endpoint_factory()()\n"
            "ep.__dict__.update(id='e1', hostname='h')\n"
            "make_transient_to_detached(ep)\n"
            "print(ep.id, ep.hostname)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["e1", "h"]

"""Values that one catalog database would take and the other refuse, sent through the API:
the same answer on SQLite and PostgreSQL, never a 500, and a refused commit leaves nothing
in the store. Also the catalog going away while the server runs (503, then back)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from strata.engine.backup import backup
from strata.server.app import create_app
from strata.server.context import ServerSettings


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, catalogs) -> Iterator[SimpleNamespace]:
    """An in-process server on each catalog database, an enrolled device, and a snapshot's
    manifest already in the store (made locally), ready to be committed through the API."""
    base = tmp_path_factory.mktemp("catalog-api")
    app = create_app(ServerSettings(data_dir=base / "data", catalog_url=catalogs.new()))
    with TestClient(app) as client:
        admin = {"Authorization": f"Bearer {app.state.admin_token_path.read_text().strip()}"}
        token = client.post("/api/v1/admin/tokens", json={"uses": 10}, headers=admin).json()
        doc = client.post("/api/v1/agent/enroll", json={
            "token": token["token"], "hostname": "probe", "os": "linux"}).json()
        src = base / "src"
        src.mkdir()
        (src / "file.txt").write_text("some content\n" * 100)
        store = app.state.ctx.store
        snap = store.load_snapshot(backup(store, src, host="local").snapshot)
        # As if the endpoint had uploaded them: a commit may name only chunks it holds.
        app.state.ctx.holdings.record(doc["endpoint_id"], app.state.ctx.snapshot_chunks(snap.id))
        yield SimpleNamespace(
            client=client, app=app, admin=admin, token=token["token"], store=store,
            device={"Authorization": f"Bearer {doc['credential']}"},
            commit={"manifest": snap.manifest, "manifest_id": snap.manifest_id,
                    "stats": {"files": 1, "bytes_total": 1300}, "kind": "centralize"})


def endpoint_doc(api: SimpleNamespace, name: str) -> dict:
    endpoints = api.client.get("/api/v1/admin/endpoints", headers=api.admin).json()
    return next(e for e in endpoints if e["hostname"].startswith(name))


def test_long_or_odd_hostnames_are_kept_cut_to_size(api):
    resp = api.client.post("/api/v1/agent/enroll", json={
        "token": api.token, "hostname": "nul\x00host", "os": "linux\x00"})
    assert resp.status_code == 200, resp.text
    ep = endpoint_doc(api, "nul")
    assert (ep["hostname"], ep["os"]) == ("nul\ufffdhost", "linux\ufffd")

    device = {"Authorization": f"Bearer {resp.json()['credential']}"}
    resp = api.client.post("/api/v1/agent/checkin", headers=device,
                           json={"inventory": {"hostname": "long" + "x" * 1000}})
    assert resp.status_code == 200, resp.text
    assert endpoint_doc(api, "long")["hostname"] == ("long" + "x" * 1000)[:255]


def post_json(api: SimpleNamespace, path: str, doc: dict) -> object:
    """POST a body that may hold NaN (json.dumps writes it; the server's parser accepts it)."""
    return api.client.post(path, content=json.dumps(doc),
                           headers={**api.device, "Content-Type": "application/json"})


def test_an_inventory_with_nan_is_refused(api):
    resp = post_json(api, "/api/v1/agent/checkin", {"inventory": {"ram": float("nan")}})
    assert resp.status_code == 422, resp.text
    assert "finite" in resp.json()["detail"]
    assert endpoint_doc(api, "probe")["inventory"] == {}


def test_numbers_too_large_for_the_catalog_are_refused(api):
    resp = api.client.post("/api/v1/admin/tokens", json={"uses": 1 << 40}, headers=api.admin)
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"] == f"refused: number out of range: {1 << 40}"


@pytest.mark.parametrize("change", [
    {"trigger": "t" * 17},
    {"kind": "k" * 17},
    {"retries": 1 << 31},
    {"bytes_on_wire": 1 << 63},
    {"seconds": 1e12},
    {"stats": {"files": (1 << 30) + 1}},
    {"stats": {"bytes_new": "many"}},
    {"stats": {"files_new": -1}},
], ids=lambda c: next(iter(c)) + ("." + next(iter(c["stats"])) if "stats" in c else ""))
def test_a_commit_the_catalog_cannot_record_stores_nothing(api, change):
    before = sorted(api.store.snapshot_ids())
    resp = api.client.post("/api/v1/agent/snapshots", headers=api.device,
                           json={**api.commit, **change})
    assert resp.status_code == 422, resp.text
    assert sorted(api.store.snapshot_ids()) == before


def test_a_commit_with_nan_seconds_stores_nothing(api):
    before = sorted(api.store.snapshot_ids())
    resp = post_json(api, "/api/v1/agent/snapshots", {**api.commit, "seconds": float("nan")})
    assert resp.status_code == 422, resp.text
    assert sorted(api.store.snapshot_ids()) == before


def test_a_good_commit_is_recorded(api):
    resp = api.client.post("/api/v1/agent/snapshots", headers=api.device, json=api.commit)
    assert resp.status_code == 200, resp.text
    sid = resp.json()["snapshot"]
    listed = api.client.get("/api/v1/agent/snapshots", headers=api.device).json()
    assert [s["id"] for s in listed] == [sid]
    assert listed[0]["time"].endswith("Z") or listed[0]["time"].endswith("+00:00")
    resp = api.client.post("/api/v1/agent/transactions/restore", headers=api.device,
                           json={"snapshot": sid, "result": "r" * 17})
    assert resp.status_code == 422, resp.text


def test_a_token_is_spent_once_by_two_servers_on_one_database(pg_cluster, tmp_path):
    """Two server processes (here two apps, each with its own writer lock, on the one
    data directory and store that a PostgreSQL catalog's processes share) enroll with the
    same one-use tokens at the same moment: the row lock lets exactly one through."""
    url = pg_cluster.new_database()
    apps = [create_app(ServerSettings(data_dir=tmp_path / "server", catalog_url=url))
            for _ in range(2)]
    with TestClient(apps[0]) as one, TestClient(apps[1]) as two:
        admin = {"Authorization":
                 f"Bearer {apps[0].state.admin_token_path.read_text().strip()}"}
        tokens = [one.post("/api/v1/admin/tokens", json={"uses": 1}, headers=admin)
                  .json()["token"] for _ in range(12)]
        barrier = threading.Barrier(2)

        def enroll(client: TestClient, token: str) -> int:
            barrier.wait()
            return client.post("/api/v1/agent/enroll", json={
                "token": token, "hostname": "racer", "os": "linux"}).status_code

        with ThreadPoolExecutor(2) as pool:
            for token in tokens:
                codes = sorted(pool.map(enroll, (one, two), (token, token)))
                assert codes == [200, 401], codes


def test_endpoint_references_ignore_case_on_both(api):
    eid = endpoint_doc(api, "probe")["id"]
    for ref in (eid[:8], eid[:8].upper()):
        resp = api.client.get(f"/api/v1/admin/endpoints/{ref}", headers=api.admin)
        assert resp.status_code == 200 and resp.json()["id"] == eid, (ref, resp.text)
    assert api.client.get("/api/v1/admin/endpoints/%25", headers=api.admin).status_code == 404


def test_a_catalog_that_goes_away_is_a_503_until_it_is_back(pg_cluster, tmp_path):
    url = pg_cluster.new_database()
    name = url.rsplit("/", 1)[1]
    app = create_app(ServerSettings(data_dir=tmp_path / "data", catalog_url=url))
    admin = {"Authorization": f"Bearer {app.state.admin_token_path.read_text().strip()}"}
    with TestClient(app) as client:
        token = client.post("/api/v1/admin/tokens", json={}, headers=admin).json()["token"]
        device = {"Authorization": "Bearer " + client.post("/api/v1/agent/enroll", json={
            "token": token, "hostname": "h", "os": "linux"}).json()["credential"]}
        assert client.post("/api/v1/agent/checkin", json={}, headers=device).status_code == 200
        assert client.get("/api/v1/admin/endpoints", headers=admin).status_code == 200
        # The database refuses new connections and drops the server's open ones.
        pg_cluster.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        pg_cluster.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           f"WHERE datname = '{name}'")
        resp = client.get("/api/v1/admin/endpoints", headers=admin)
        assert resp.status_code == 503, resp.text
        assert resp.json()["detail"] == "the catalog database is unavailable; try again later"
        assert resp.headers["retry-after"] == "10"
        # A check-in is served from the caches meanwhile.
        assert client.post("/api/v1/agent/checkin", json={}, headers=device).status_code == 200
        pg_cluster.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        assert client.get("/api/v1/admin/endpoints", headers=admin).status_code == 200

"""The server's side of the learned sets (server/services/usage.py): a crafted boot-set
list is refused before it is stored (paths that climb out, absolute paths, huge lists,
bodies beyond the limit), each endpoint reads back only its own sets, a restore to new
hardware moves them with the CVD, and deleting an endpoint deletes them. In-process
(FastAPI's test client) on a real catalog."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from strata.model.usage import MAX_BOOT_PATHS
from strata.server.app import create_app
from strata.server.catalog.models import UsageSet
from strata.server.context import ServerSettings
from strata.server.services import usage

API = "/api/v1/agent"


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[SimpleNamespace]:
    app = create_app(ServerSettings(data_dir=tmp_path / "data"))
    token = (tmp_path / "data/admin.token").read_text().strip()
    with TestClient(app) as admin:
        admin.headers["Authorization"] = f"Bearer {token}"
        yield SimpleNamespace(app=app, ctx=app.state.ctx, admin=admin)


def device(server: SimpleNamespace, hostname: str) -> tuple[str, TestClient]:
    tok = server.admin.post("/api/v1/admin/tokens", json={"uses": 1}).json()["token"]
    http = TestClient(server.app)
    resp = http.post(f"{API}/enroll", json={"token": tok, "hostname": hostname,
                                             "os": "debian"})
    assert resp.status_code == 200, resp.text
    http.headers["Authorization"] = f"Bearer {resp.json()['credential']}"
    return resp.json()["endpoint_id"], http


def stored(server: SimpleNamespace, eid: str) -> UsageSet | None:
    with server.ctx.session() as db:
        return db.get(UsageSet, eid)


def test_sets_are_kept_per_endpoint_and_read_back_only_by_it(server):
    a, http_a = device(server, "a")
    b, http_b = device(server, "b")
    resp = http_a.put(f"{API}/usage", json={"boot": ["usr/lib/libc.so.6", "etc/fstab"],
                                             "working": ["home/ann/x.odt"], "boots_seen": 3})
    assert resp.status_code == 200 and resp.json()["boot"] == 2, resp.text
    assert http_a.get(f"{API}/usage").json()["boot"] == ["usr/lib/libc.so.6", "etc/fstab"]
    assert http_b.get(f"{API}/usage").json() == {"boot": [], "working": [], "boots_seen": 0,
                                                 "learned_at": None}
    summary = server.admin.get(f"/api/v1/admin/endpoints/{a}/usage").json()
    assert summary["boot"] == 2 and summary["working"] == 1 and "paths" not in summary
    assert TestClient(server.app).get(f"{API}/usage").status_code == 401
    del b


def test_a_crafted_path_is_refused_and_nothing_stored(server):
    eid, http = device(server, "a")
    for bad in ["../../etc/shadow", "/etc/shadow", "usr/../../x", "a//b", "./a", "a\x00b", "",
                "x" * 4097]:
        for doc in ({"boot": ["ok/path", bad]}, {"working": [bad]}):
            resp = http.put(f"{API}/usage", json=doc)
            assert resp.status_code == 422, (bad, resp.text)
    assert stored(server, eid) is None


def test_a_huge_list_is_refused(server):
    eid, http = device(server, "a")
    resp = http.put(f"{API}/usage", json={"boot": ["a"] * (MAX_BOOT_PATHS + 1)})
    assert resp.status_code == 422 and "at most 20000 paths" in resp.text
    # Beyond the JSON body limit: refused before it is read whole.
    resp = http.put(f"{API}/usage", json={"working": ["p/" + "x" * 4000] * 1100})
    assert resp.status_code == 413
    assert stored(server, eid) is None


def test_the_sets_move_with_the_cvd_and_go_with_the_endpoint(server):
    old, http_old = device(server, "old")
    new, http_new = device(server, "new")
    http_old.put(f"{API}/usage", json={"boot": ["etc/fstab"], "working": ["home/a"]})
    http_new.put(f"{API}/usage", json={"boot": ["fresh/install"]})
    with server.ctx.write() as db:
        assert usage.move(db, old, new) == (1, 1)
    assert http_new.get(f"{API}/usage").json()["boot"] == ["etc/fstab"]
    assert stored(server, old) is None
    resp = server.admin.delete(f"/api/v1/admin/endpoints/{new}")
    assert resp.status_code == 200, resp.text
    assert stored(server, new) is None

"""The server's read-through cache never serves a value read before the change that
outdated it: revocation, approval, assignment and policy changes take effect at the very
next request, even when a check-in was loading the old value as the change committed.

The race is made deterministic with a hook that runs the administrator's change at the
worst moment: after a check-in's load finished and before the cache stores what it read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from signing_fixtures import init_signing_in_process
from strata.model.admin import AssignRequest
from strata.model.entry import Entry, EntryType
from strata.server import read_cache
from strata.server.app import create_app
from strata.server.context import ServerContext, ServerSettings
from strata.server.read_cache import ReadCache
from strata.server.services import assignments, endpoints, policies
from strata.server.services.layers import save_layer

ROUNDS = 40


# -- the cache alone ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_hit_is_served_until_its_ttl_and_a_miss_is_never_stored():
    clock = Clock()
    cache = ReadCache(ttl=10, clock=clock)
    loads = []
    assert cache.get("k", lambda: loads.append(1) or "v1") == "v1"
    assert cache.get("k", lambda: "other") == "v1"
    clock.now = 10.5
    assert cache.get("k", lambda: "v2") == "v2"
    assert cache.get("none", lambda: None) is None
    assert len(cache) == 1


@pytest.mark.parametrize("change", ["clear", "discard same key", "discard other key"])
def test_a_value_loaded_before_an_invalidation_is_not_stored(change):
    cache = ReadCache(ttl=300)
    state = {"value": "old"}

    def load_then_change() -> str:
        seen = state["value"]  # the load reads the catalog ...
        state["value"] = "new"  # ... an admin change commits ...
        if change == "clear":  # ... and invalidates, before the load's value is stored
            cache.clear()
        else:
            cache.discard("k" if change == "discard same key" else "other")
        return seen

    assert cache.get("k", load_then_change) == "old"  # its own caller began before the change
    assert cache.get("k", lambda: state["value"]) == "new"  # the next one sees it


def test_without_a_race_values_are_cached():
    cache = ReadCache(ttl=300)
    cache.get("a", lambda: 1)
    cache.clear()
    cache.get("a", lambda: 2)
    assert cache.get("a", lambda: 3) == 2


def test_a_load_that_fills_other_keys_stores_all_or_none_of_them():
    cache = ReadCache(ttl=300)
    assert cache.get_filling("device", lambda: ("ep", {"head": "h1", "none": None})) == "ep"
    assert cache.get("head", lambda: "reloaded") == "h1"  # filled with it
    assert cache.get("none", lambda: "loaded") == "loaded"  # a None is never kept

    def fill_then_change() -> tuple[str, dict[str, object]]:
        cache.discard("unrelated")  # an invalidation lands while the load reads
        return "ep2", {"head": "h2"}

    cache.clear()
    assert cache.get_filling("device", fill_then_change) == "ep2"
    assert cache.get("device", lambda: "fresh") == "fresh"
    assert cache.get("head", lambda: "fresh") == "fresh"


def test_where_only_hits_may_be_served_a_miss_raises_instead_of_loading():
    cache = ReadCache(ttl=300)
    cache.get("warm", lambda: 1)
    loads: list[str] = []
    with read_cache.hits_only():
        assert cache.get("warm", lambda: loads.append("warm") or 2) == 1
        with pytest.raises(read_cache.NeedsLoad):
            cache.get("cold", lambda: loads.append("cold") or 3)
        with pytest.raises(read_cache.NeedsLoad):
            cache.get_filling("cold", lambda: (loads.append("cold") or 3, {}))
        assert not read_cache.may_load()
    assert loads == [] and read_cache.may_load()
    assert cache.get("cold", lambda: 3) == 3


# -- check-ins against a real app ----------------------------------------------------------


@pytest.fixture()
def app(tmp_path: Path) -> Iterator[tuple[TestClient, ServerContext, dict]]:
    application = create_app(ServerSettings(data_dir=tmp_path / "data",
                                            maintenance_interval=3600))
    ctx: ServerContext = application.state.ctx
    token = (tmp_path / "data/admin.token").read_text().strip()
    with TestClient(application) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        yield client, ctx, {"Authorization": f"Bearer {token}"}
    read_cache.after_load_hook = None


def _enroll(client: TestClient, approval: bool = False) -> tuple[str, dict]:
    tok = client.post("/api/v1/admin/tokens", json={"uses": 1, "require_approval": approval})
    resp = client.post("/api/v1/agent/enroll", json={"token": tok.json()["token"],
                                                     "hostname": "h", "os": "debian"},
                       headers={"Authorization": ""})
    body = resp.json()
    return body["endpoint_id"], {"Authorization": f"Bearer {body['credential']}"}


def _checkin(client: TestClient, device: dict) -> tuple[int, dict]:
    resp = client.post("/api/v1/agent/checkin", json={"inventory": {}, "status": {}},
                       headers=device)
    return resp.status_code, resp.json()


def _race(ctx: ServerContext, prefix: str, change: Callable[[], None]) -> None:
    """Arm the hook: the next load of a key starting with `prefix` runs `change` (commit
    and invalidate) between reading the catalog and storing the value, once. The cache
    starts empty, as when an entry has just expired: a hit involves no load to race."""
    ctx.invalidate()
    armed = [True]

    def hook(key: str) -> None:
        if armed[0] and key.startswith(prefix):
            armed[0] = False
            change()
    read_cache.after_load_hook = hook


def _layers(ctx: ServerContext) -> None:
    with ctx.write() as db:
        for version in ("1", "2"):
            save_layer(ctx, db, kind="base", name="os", version=version, family="linux",
                       entries=[Entry(path=b"usr", type=EntryType.DIR, mode=0o755),
                                Entry(path=f"usr/v{version}".encode(), type=EntryType.DIR)])


def test_assignment_takes_effect_at_the_next_checkin(app):
    client, ctx, _ = app
    # Assignments need signing set up (the agents' side is not what this test is about).
    init_signing_in_process(client, ctx.settings.data_dir.parent / "keys")
    _layers(ctx)
    eid, device = _enroll(client)
    assert client.post("/api/v1/admin/assign",
                       json={"endpoints": [eid], "base": "os:1"}).status_code == 200
    current = "1"
    for _ in range(ROUNDS):
        target = "2" if current == "1" else "1"
        _race(ctx, "desired:", lambda t=target: assignments.assign(
            ctx, AssignRequest(endpoints=[eid], base=f"os:{t}"), actor="admin"))
        status, racing = _checkin(client, device)
        assert status == 200
        assert racing["desired"]["layers"][0]["version"] == current  # began before it
        status, after = _checkin(client, device)
        assert after["desired"]["layers"][0]["version"] == target
        current = target


def test_revocation_takes_effect_at_the_next_request(app):
    client, ctx, _ = app
    for _ in range(ROUNDS):
        eid, device = _enroll(client)
        _race(ctx, "device:", lambda e=eid: endpoints.revoke(ctx, e, actor="admin"))
        assert _checkin(client, device)[0] == 200
        status, body = _checkin(client, device)
        assert status == 403 and "revoked" in body["detail"]


def test_approval_takes_effect_at_the_next_request(app):
    client, ctx, _ = app
    for _ in range(ROUNDS):
        eid, device = _enroll(client, approval=True)
        _race(ctx, "device:", lambda e=eid: endpoints.approve(ctx, e, actor="admin"))
        status, body = _checkin(client, device)
        assert status == 403 and "approval" in body["detail"]
        assert _checkin(client, device)[0] == 200


def test_policy_change_takes_effect_at_the_next_checkin(app):
    client, ctx, _ = app
    _, device = _enroll(client)
    interval = 3600
    for i in range(ROUNDS):
        new = 600 + 60 * i
        _race(ctx, "policy:upload", lambda n=new: policies.write_policy(
            ctx, "upload", {"interval_seconds": n, "exclusions": {}}, actor="admin"))
        status, racing = _checkin(client, device)
        assert racing["policy"]["interval_seconds"] == interval
        status, after = _checkin(client, device)
        assert after["policy"]["interval_seconds"] == new
        interval = new

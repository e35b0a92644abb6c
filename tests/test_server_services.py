"""The server's seams: services refuse with StrataError subclasses that the app answers
with their status; one snapshot lookup and one rule matcher serve every caller; every
admin answer is typed in the OpenAPI document, and the CLI's typed client prints exactly
what the server answered (`--json` output keeps the API's shapes)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from pydantic import TypeAdapter

from signing_fixtures import init_signing_in_process
from strata.cli.admin_client import as_json, build
from strata.errors import Conflict, Invalid, NotFound, StrataError
from strata.model import admin as models
from strata.model.entry import Entry, EntryType
from strata.server.app import create_app
from strata.server.catalog.models import Endpoint, SnapshotRecord
from strata.server.context import ServerContext, ServerSettings
from strata.server.services import snapshots
from strata.server.services.facts import endpoint_family, rule_matches
from strata.server.services.layers import save_layer
from strata.server.services.lookup import find_layer


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[SimpleNamespace]:
    app = create_app(ServerSettings(data_dir=tmp_path / "data"))
    ctx: ServerContext = app.state.ctx
    token = (tmp_path / "data/admin.token").read_text().strip()
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        # Assignments, migrations and reverts need signing set up.
        init_signing_in_process(client, tmp_path / "keys")
        yield SimpleNamespace(app=app, ctx=ctx, client=client)


def _enroll(client: TestClient, hostname: str, **inventory: object) -> str:
    tok = client.post("/api/v1/admin/tokens", json={"uses": 1}).json()["token"]
    resp = client.post("/api/v1/agent/enroll", headers={"Authorization": ""},
                       json={"token": tok, "hostname": hostname, "os": "debian",
                             "inventory": inventory})
    return resp.json()["endpoint_id"]


def _add_snapshots(ctx: ServerContext, endpoint_id: str, ids: list[str]) -> None:
    """Catalog rows only: what the lookup reads."""
    start = datetime(2024, 1, 1, tzinfo=UTC)
    with ctx.write() as db:
        cvd = snapshots.cvd_of(db, endpoint_id)
        assert cvd is not None
        for i, sid in enumerate(ids):
            db.add(SnapshotRecord(id=sid, cvd_id=cvd.id, time=start + timedelta(hours=i)))
        cvd.last_snapshot = ids[-1]


def test_one_snapshot_lookup_resolves_latest_prefixes_and_never_another_cvd(server):
    ctx = server.ctx
    mine, other = _enroll(server.client, "a"), _enroll(server.client, "b")
    with ctx.session() as db, pytest.raises(Conflict, match="has not centralized yet"):
        snapshots.find_snapshot(db, mine, "latest")
    _add_snapshots(ctx, mine, ["aa11" + "0" * 60, "aa22" + "0" * 60, "bb33" + "0" * 60])
    _add_snapshots(ctx, other, ["cc44" + "0" * 60])
    with ctx.session() as db:
        assert snapshots.find_snapshot(db, mine, "latest").id.startswith("bb33")
        assert snapshots.find_snapshot(db, mine, "").id.startswith("bb33")
        assert snapshots.find_snapshot(db, mine, "AA22").id.startswith("aa22")
        with pytest.raises(Invalid, match="snapshot 'aa' of endpoint .* is ambiguous"):
            snapshots.find_snapshot(db, mine, "aa")  # two of mine: said so
        with pytest.raises(NotFound, match="of this endpoint"):
            snapshots.find_snapshot(db, mine, "cc44", owner="this endpoint")
        with pytest.raises(NotFound):
            snapshots.find_snapshot(db, mine, "%")  # a prefix is text, not a pattern


def test_agents_cannot_read_another_endpoints_snapshot_by_prefix(server):
    client, ctx = server.client, server.ctx
    tok = client.post("/api/v1/admin/tokens", json={}).json()["token"]
    me = client.post("/api/v1/agent/enroll", headers={"Authorization": ""},
                     json={"token": tok, "hostname": "me"}).json()
    device = {"Authorization": f"Bearer {me['credential']}"}
    assert client.get("/api/v1/agent/snapshots/latest/manifest",
                      headers=device).status_code == 409  # nothing centralized yet
    other = _enroll(client, "other")
    _add_snapshots(ctx, me["endpoint_id"], ["aa11" + "0" * 60])
    _add_snapshots(ctx, other, ["cc44" + "0" * 60])
    resp = client.get("/api/v1/agent/snapshots/cc44/manifest", headers=device)
    assert resp.status_code == 404
    assert resp.json() == {"detail": "no snapshot 'cc44' of this endpoint"}


@pytest.mark.parametrize(("rule", "facts", "tags", "expected"), [
    ({"vendor": "dell*"}, {"vendor": "Dell Inc."}, [], True),  # facts fold case
    ({"vendor": "Dell*", "model": "Latitude*"}, {"vendor": "Dell", "model": "XPS"}, [], False),
    ({"os": "debian", "tag": "lab"}, {"os": "Debian"}, ["lab", "x"], True),
    ({"tag": "Lab"}, {}, ["lab"], False),  # tags are the admin's own labels: exact
    ({"model": "*"}, {}, [], True),  # a missing fact is empty, which "*" matches
    ({}, {"vendor": "x"}, [], True),
])
def test_one_rule_matcher_for_drivers_and_collections(rule, facts, tags, expected):
    assert rule_matches(rule, facts, tags) is expected


def test_os_family_of_an_endpoint_comes_from_its_os_or_else_its_inventory():
    assert endpoint_family(Endpoint(os="Windows 11", inventory={})) == "windows"
    assert endpoint_family(Endpoint(os="", inventory={"os": "windows"})) == "windows"
    assert endpoint_family(Endpoint(os="debian", inventory={"os": "windows"})) == "linux"


def test_services_refuse_with_errors_the_app_answers_with_their_status(server):
    ctx = server.ctx
    with ctx.session() as db:
        with pytest.raises(Invalid):
            find_layer(db, "corp")
        with pytest.raises(NotFound):
            find_layer(db, "corp:1")
    for exc in (NotFound("x"), Conflict("x"), Invalid("x")):
        assert isinstance(exc, StrataError)
    client = server.client
    assert client.get("/api/v1/admin/layers/corp").status_code == 422
    assert client.get("/api/v1/admin/layers/corp:1").json() == {"detail": "no layer 'corp:1'"}
    assert client.get("/api/v1/admin/endpoints/nosuch").status_code == 404
    assert client.post("/api/v1/admin/assign", json={"all": True}).status_code == 422
    eid = _enroll(client, "a")
    resp = client.post(f"/api/v1/admin/endpoints/{eid}/restore", json={"to_endpoint": eid})
    assert resp.status_code == 422 and "is a revert" in resp.json()["detail"]


def test_every_admin_answer_is_typed_in_the_openapi_document(server):
    doc = server.client.get("/api/v1/openapi.json").json()
    untyped = []
    for path, operations in doc["paths"].items():
        if not path.startswith("/api/v1/admin/"):
            continue
        for method, op in operations.items():
            content = op["responses"]["200"]["content"]
            if "application/json" not in content:
                continue  # bytes kept exactly as signed or stored (TUF metadata, manifests)
            schema = content["application/json"]["schema"]
            if schema in ({}, {"type": "object"}, {"type": "object", "title": "Response"}):
                untyped.append(f"{method.upper()} {path}")
    assert not untyped
    assert "EndpointDetail" in doc["components"]["schemas"]
    assert "ComplianceReport" in doc["components"]["schemas"]


def test_the_clients_models_print_exactly_what_the_server_answered(server):
    """The CLI parses every answer into its model and prints it back for --json: that
    must not add, drop or reformat a field, whatever the endpoint or layer state."""
    ctx, client = server.ctx, server.client
    with ctx.write() as db:
        for v in ("1", "2"):
            save_layer(ctx, db, kind="base", name="os", version=v, family="linux",
                       entries=[Entry(path=b"usr", type=EntryType.DIR, mode=0o755),
                                Entry(path=f"usr/v{v}".encode(), type=EntryType.DIR)])
    eid = _enroll(client, "pc-1", hardware={"vendor": "Dell", "model": "X"},
                  disks=[{"free_bytes": 1.5}], note=None)
    client.put(f"/api/v1/admin/endpoints/{eid}/tags", json={"tags": ["lab"]})
    client.post("/api/v1/admin/collections", json={"name": "lab", "rule": {"tag": "lab"}})
    client.post("/api/v1/admin/assign", json={"endpoints": [eid], "base": "os:1"})
    _add_snapshots(ctx, eid, ["aa11" + "0" * 60])
    api = "/api/v1/admin"
    answers = [
        (list[models.EndpointSummary], client.get(f"{api}/endpoints")),
        (models.EndpointDetail, client.get(f"{api}/endpoints/{eid[:8]}")),
        (list[models.LayerInfo], client.get(f"{api}/layers")),
        (models.LayerDetailWithFiles | models.LayerDetail, client.get(f"{api}/layers/os:1")),
        (models.LayerDetailWithFiles | models.LayerDetail,
         client.get(f"{api}/layers/os:1?files=true")),
        (models.LayerDiff, client.get(f"{api}/layers/os:1/diff/os:2")),
        (list[models.CollectionInfo], client.get(f"{api}/collections")),
        (models.ComplianceReport, client.get(f"{api}/compliance")),
        (models.TaskInfo, client.post(f"{api}/migrate", json={"collection": "lab",
                                                                 "base": "os:2"})),
        (models.RevertResult, client.post(f"{api}/endpoints/{eid}/revert",
                                          json={"snapshot": "latest"})),
        (list[models.TransactionInfo], client.get(f"{api}/transactions")),
        (list[models.AuditEntryInfo], client.get(f"{api}/audit")),
        (models.StoreFigures, client.get(f"{api}/stats")),
        (models.CaptureConfig, client.get(f"{api}/capture-config")),
    ]
    for shape, resp in answers:
        assert resp.status_code == 200, resp.text
        parsed = TypeAdapter(shape).validate_python(resp.json())
        assert as_json(parsed) == resp.json(), shape
    shown = TypeAdapter(models.LayerDetailWithFiles | models.LayerDetail).validate_python(
        client.get(f"{api}/layers/os:1").json())
    assert "file_list" not in as_json(shown)


def test_a_request_the_server_would_refuse_is_one_line_before_it_is_sent():
    with pytest.raises(StrataError) as info:
        build(models.TagsRequest, tags=["t"] * 65)
    assert "\n" not in str(info.value) and str(info.value).startswith("tags:")
    assert build(models.TagsRequest, tags=["a"]).tags == ["a"]

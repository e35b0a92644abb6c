"""Deleting an endpoint and planning retention behave alike on both catalog databases
(SQLite, PostgreSQL, which enforces every foreign key): the endpoint goes with its CVD,
snapshots, transactions, assignment and collection memberships, its neighbour stays
whole; a retention cut keeps recent revert points on both."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from strata.engine.backup import backup
from strata.server.app import create_app
from strata.server.catalog.models import (
    Assignment,
    Collection,
    Cvd,
    Endpoint,
    SnapshotRecord,
    Transaction,
)
from strata.server.context import ServerSettings
from strata.server.services.endpoints import delete_endpoint
from strata.server.services.retention import plan_retention


def _fleet(tmp_path, catalogs):
    """Two endpoints with three snapshots each (one a revert point), a transaction, an
    assignment and a shared collection."""
    app = create_app(ServerSettings(data_dir=tmp_path / "data", catalog_url=catalogs.new()))
    ctx = app.state.ctx
    src = tmp_path / "src"
    src.mkdir()
    now = datetime.now(UTC)
    with ctx.write() as db:
        for i, eid in enumerate(("ep-1", "ep-2")):
            db.add(Endpoint(id=eid, hostname=f"host-{i}", credential_hash=str(i) * 64))
            db.flush()
            db.add(Cvd(endpoint_id=eid))
            db.add(Assignment(endpoint_id=eid))
            db.add(Transaction(endpoint_id=eid, kind="centralize"))
        db.add(Collection(name="lab", members=["ep-1", "ep-2"]))
    sids: dict[str, list[str]] = {"ep-1": [], "ep-2": []}
    for eid in sids:
        for n in range(3):
            (src / "f").write_text(f"{eid} {n}\n")
            sid = backup(ctx.store, src, host=eid, parent=False).snapshot
            sids[eid].append(sid)
            with ctx.write() as db:
                cvd = db.scalar(select(Cvd).where(Cvd.endpoint_id == eid))
                db.add(SnapshotRecord(id=sid, cvd_id=cvd.id, time=now - timedelta(hours=3 - n),
                                      trigger="pre-update" if n == 0 else "scheduled"))
    return app, ctx, sids


def test_deleting_an_endpoint_takes_exactly_its_own(tmp_path, catalogs):
    app, ctx, sids = _fleet(tmp_path, catalogs)
    with TestClient(app):
        done = delete_endpoint(ctx, "ep-1", actor="admin")
        assert (done.deleted, done.snapshots) == ("ep-1", 3)
        with ctx.session() as db:
            assert db.get(Endpoint, "ep-1") is None and db.get(Endpoint, "ep-2") is not None
            counts = {model.__name__: db.scalar(select(func.count()).select_from(model))
                      for model in (Cvd, SnapshotRecord, Transaction, Assignment)}
            assert counts == {"Cvd": 1, "SnapshotRecord": 3, "Transaction": 1, "Assignment": 1}
            assert db.get(Collection, "lab").members == ["ep-2"]
        assert set(ctx.store.snapshot_ids()) == set(sids["ep-2"])


def test_a_retention_cut_spares_recent_revert_points(tmp_path, catalogs):
    app, ctx, sids = _fleet(tmp_path, catalogs)
    with TestClient(app), ctx.session() as db:
        plan = {p.endpoint_id: p for p in plan_retention(db, {"last": 1})}
    for eid, ids in sids.items():
        # Newest kept by `last`, the oldest (a 3-hour-old revert point) kept as one:
        # only the middle one goes.
        assert plan[eid].removed == [ids[1]] and plan[eid].revert_points_removed == 0

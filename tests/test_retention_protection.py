"""The history a restore moves onto new hardware is protected from retention for the
policy's `protect_days` from the move, as revert points are from when they were taken:
the new machine's first snapshots must not push the old machine's history out of the
counts at the next maintenance."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from strata.engine.backup import backup
from strata.model.admin import RestoreRequest
from strata.server.app import create_app
from strata.server.catalog.models import Cvd, Endpoint, SnapshotRecord
from strata.server.context import ServerSettings
from strata.server.policies import validate_policy
from strata.server.services.operations import restore_to
from strata.server.services.retention import plan_retention


def test_history_moved_by_a_restore_survives_a_retention_cut(tmp_path):
    app = create_app(ServerSettings(data_dir=tmp_path / "data", maintenance_interval=3600))
    ctx = app.state.ctx
    src = tmp_path / "src"
    src.mkdir()
    now = datetime.now(UTC)
    with TestClient(app):
        with ctx.write() as db:
            for eid in ("old", "new"):
                db.add(Endpoint(id=eid, hostname=eid, credential_hash=eid[0] * 64))
                db.flush()
                db.add(Cvd(endpoint_id=eid))
        # A year of the old machine's history: one snapshot a month.
        history = []
        for month in range(12):
            (src / "f").write_text(f"month {month}\n")
            sid = backup(ctx.store, src, host="old", parent=False).snapshot
            history.append(sid)
            with ctx.write() as db:
                cvd = db.scalar(select(Cvd.id).where(Cvd.endpoint_id == "old"))
                db.add(SnapshotRecord(id=sid, cvd_id=cvd,
                                      time=now - timedelta(days=30 * (12 - month))))
        ctx.store.flush()
        cut = {"last": 2, "protect_days": 30}
        with ctx.session() as db:
            before = {p.endpoint_id: p.removed for p in plan_retention(db, cut)}
        assert len(before["old"]) == 10  # without a move, the counts decide

        restore_to(ctx, "old", RestoreRequest(to_endpoint="new"), actor="test")
        with ctx.session() as db:
            moved = {p.endpoint_id: p for p in plan_retention(db, cut)}
            assert moved["new"].snapshots == 12 and moved["new"].removed == []
            # 31 days after the move, the counts decide again.
            later = {p.endpoint_id: p.removed
                     for p in plan_retention(db, cut, now=now + timedelta(days=31))}
            assert sorted(later["new"]) == sorted(history[:10])
            # protect_days 0 turns the protection off.
            off = {p.endpoint_id: p.removed
                   for p in plan_retention(db, {"last": 2, "protect_days": 0})}
            assert sorted(off["new"]) == sorted(history[:10])


@pytest.mark.parametrize(("doc", "words"), [
    ({"last": 1, "protect_days": -2}, "protect_days must be 0 or more"),
    ({"last": 1, "protect_days": 3, "revert_points_days": 3}, "give protect_days only"),
    ({"last": 1, "protect_days": "long"}, "protect_days must be a whole number"),
])
def test_protect_days_is_checked(doc, words):
    with pytest.raises(ValueError, match=words):
        validate_policy("retention", doc)


def test_revert_points_days_still_reads_as_protect_days():
    assert validate_policy("retention", {"last": 1, "revert_points_days": 7}) == {
        "last": 1, "revert_points_days": 7}

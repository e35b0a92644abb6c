"""Scheduled upkeep on the server: retention per CVD, then prune (in-process app)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from strata.engine.backup import backup
from strata.server.app import create_app
from strata.server.catalog.models import Cvd, Endpoint, SnapshotRecord
from strata.server.context import ServerSettings
from strata.server.maintenance import run_maintenance
from strata.server.policies import DEFAULTS


def _app(tmp_path: Path, catalog: str = ""):
    return create_app(ServerSettings(data_dir=tmp_path / "data", catalog_url=catalog,
                                     maintenance_interval=3600))


def test_admin_token_is_created_private_on_first_start(tmp_path):
    app = _app(tmp_path)
    token = tmp_path / "data/admin.token"
    assert token.exists() and (token.stat().st_mode & 0o777) == 0o600
    assert app.state.admin_token_path == token


def test_retention_keeps_a_year_by_default_and_prune_frees_space(tmp_path, catalogs):
    app = _app(tmp_path, catalogs.new())
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
        # 40 hourly snapshots, each with its own data, spread over the last 40 hours.
        now = datetime.now(UTC)
        for i in range(40):
            (src / "f.bin").write_bytes(bytes([i]) * 200_000 + i.to_bytes(4, "little"))
            r = backup(ctx.store, src, host="ep-1", parent=False)
            with ctx.write() as db:
                db.add(SnapshotRecord(id=r.snapshot, cvd_id=cvd_id,
                                      time=now - timedelta(hours=40 - i)))
        before = sum(ctx.store.index.packs().values())
        summary = run_maintenance(ctx)
        with ctx.session() as db:
            kept = list(db.scalars(select(SnapshotRecord.id)))
        after = sum(ctx.store.index.packs().values())
    # 24 hourly + the daily/monthly ones that fall on other buckets
    assert DEFAULTS["retention"] == {"hourly": 24, "daily": 31, "monthly": 12}
    assert 24 <= len(kept) < 40
    assert summary["snapshots_removed"] == 40 - len(kept)
    assert set(kept) == set(ctx.store.snapshot_ids())
    assert "error" not in summary["prune"], summary
    assert after < before

"""Opening the catalog database and bringing its schema up to date with Alembic."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url)
    return cfg


def open_catalog(url: str) -> tuple[Engine, sessionmaker]:
    """Connect (SQLite file by default, PostgreSQL by URL) and migrate to the newest schema."""
    # Enough pooled connections for every worker thread, so none is opened per request.
    engine = create_engine(url, pool_size=32, max_overflow=32,
                           connect_args={"timeout": 30} if url.startswith("sqlite") else {})
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn: object, _record: object) -> None:
            cur = conn.cursor()  # type: ignore[attr-defined]
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            # WAL + NORMAL: a crash never corrupts the catalog; a power cut may lose the
            # last few check-in timestamps, while snapshots live durably in the store.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
    with engine.begin() as conn:
        cfg = alembic_config(url)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return engine, sessionmaker(engine, expire_on_commit=False)

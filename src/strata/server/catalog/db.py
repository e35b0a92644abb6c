"""Opening the catalog database (SQLite or PostgreSQL) and bringing its schema up to date
with Alembic. Any failure becomes one `CatalogError` line that never shows a password."""

from __future__ import annotations

import functools
import re
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import (
    URL,
    Connection,
    Engine,
    create_engine,
    create_mock_engine,
    event,
    inspect,
    make_url,
    text,
)
from sqlalchemy.engine.interfaces import DBAPIConnection, Dialect
from sqlalchemy.exc import ArgumentError, DisconnectionError, SQLAlchemyError
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from strata.errors import StrataError
from strata.server.catalog.models import Base

MIGRATIONS = Path(__file__).parent / "migrations"
URL_FORMS = "sqlite:///PATH or postgresql://USER@HOST[:PORT]/DATABASE"
# Any constant works: it only has to be the same in every Strata process sharing a database.
_MIGRATION_LOCK = 0x5354524154410001  # "STRATA" + 1
PG_CONNECT_TIMEOUT = 10  # seconds; libpq's default is to wait as long as TCP does
# SQLite connections are cheap; each PostgreSQL one is a server process, so a server keeps
# a few open and opens more only under load (up to the 40 threads that serve requests).
SQLITE_POOL = {"pool_size": 32, "max_overflow": 32}
PG_POOL = {"pool_size": 10, "max_overflow": 30}
PING_IDLE_SECONDS = 1.0


class CatalogError(StrataError):
    """The catalog database cannot be reached, is not usable, or has a newer schema."""


def redact(url: str) -> str:
    """The URL as it may be shown: any password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # both, depending on what is malformed
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def catalog_url(url: str) -> URL:
    """Parse the URL an administrator gave; `postgresql://` and `postgres://` mean psycopg 3."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # both, depending on what is malformed
        raise CatalogError(f"not a catalog URL: {redact(url)!r} (use {URL_FORMS})") from None
    if parsed.drivername in ("postgres", "postgresql", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        if parsed.database in (None, "", ":memory:"):
            raise CatalogError("an SQLite catalog needs a file: sqlite:///PATH "
                               "(a catalog in memory would be lost at every restart)")
        return parsed
    raise CatalogError(f"unsupported catalog database {parsed.drivername!r} in "
                       f"{redact(url)} (use {URL_FORMS})")


def is_postgresql(url: str) -> bool:
    """A URL naming a PostgreSQL catalog (which several server processes may share)."""
    return url.split(":", 1)[0].split("+", 1)[0] in ("postgres", "postgresql")


def db_reason(exc: BaseException) -> str:
    """The database's own words for a failure, on one line: 'connection refused',
    'password authentication failed for user "strata"', 'database "x" does not exist'."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    msg = lines[0].strip() if lines else type(orig).__name__
    msg = re.sub(r"^.* failed: ", "", msg)  # libpq: 'connection to server at ... failed: X'
    msg = re.sub(r"^(connection is bad|connection failed):\s*", "", msg)
    msg = re.sub(r"^(FATAL|ERROR):\s*", "", msg)
    if len(msg) > 1 and msg[0].isupper() and msg[1].islower():
        msg = msg[0].lower() + msg[1:]
    return msg


def alembic_config(url: str | URL) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    rendered = url if isinstance(url, str) else url.render_as_string(hide_password=False)
    cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return cfg


def create_catalog_engine(url: URL) -> Engine:
    """An engine for a URL from `catalog_url`, with what each database needs."""
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, **SQLITE_POOL, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn: object, _record: object) -> None:
            cur = conn.cursor()  # type: ignore[attr-defined]
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            # WAL + NORMAL: a crash never corrupts the catalog; a power cut may lose the
            # last few check-in timestamps, while snapshots live durably in the store.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
        return engine
    connect_args: dict[str, object] = {"application_name": "strata-server"}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT
    engine = create_engine(url, **PG_POOL, connect_args=connect_args)

    # After a database restart, a pooled connection is found dead and replaced before a
    # request uses it, instead of failing that request: pinged when taken from the pool,
    # if it sat there for PING_IDLE_SECONDS (SQLAlchemy's pool_pre_ping pinged at every
    # checkout, a round trip more for each catalog read of a check-in). One in use when
    # the database went away fails its request (503, retried by agents) and marks every
    # older connection of the pool stale, so the next ones reconnect.
    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_conn: object, record: ConnectionPoolEntry) -> None:
        record.info["returned"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry,
                      _proxy: object) -> None:
        returned = record.info.get("returned")
        if returned is None or time.monotonic() - returned < PING_IDLE_SECONDS:
            return  # just opened, or in use a moment ago
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            alive = not engine.dialect.is_disconnect(exc, dbapi_conn, None)
            if alive:
                raise
        if not alive:
            raise DisconnectionError("the catalog connection was closed: reconnecting")
    return engine


def _check_postgresql(conn: Connection, shown: str) -> None:
    encoding = conn.execute(text("SHOW server_encoding")).scalar()
    if encoding != "UTF8":
        raise CatalogError(f"the catalog database at {shown} uses the {encoding} encoding; "
                           "Strata needs UTF8 (CREATE DATABASE ... ENCODING 'UTF8' "
                           "TEMPLATE template0)")
    # Two servers starting at once on a new database would both create the tables: the
    # second waits here, then finds the schema up to date. Released at commit.
    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})


@functools.cache
def _scripts() -> ScriptDirectory:
    """The migration scripts, read once per process (their revision map: 15 ms each time)."""
    return ScriptDirectory(str(MIGRATIONS))


# The statements `create_all` runs on an empty database, by database, driver and server
# version (on which the compiled SQL may depend).
_SCHEMA_DDL: dict[tuple[str, str, object], tuple[str, ...]] = {}


def _schema_ddl(dialect: Dialect) -> tuple[str, ...]:
    """What `create_all` would run on an empty database of this kind, compiled once per
    process: compiling it took half of a new catalog's 40 ms."""
    key = (dialect.name, dialect.driver, dialect.server_version_info)
    if key not in _SCHEMA_DDL:
        statements: list[str] = []

        def compiled(sql: Any, *_args: object, **_kw: object) -> None:
            statements.append(str(sql.compile(dialect=dialect)).strip())

        mock = create_mock_engine(URL.create(f"{dialect.name}+{dialect.driver}"), compiled)
        Base.metadata.create_all(mock, checkfirst=False)
        _SCHEMA_DDL[key] = tuple(statements)
    return _SCHEMA_DDL[key]


def create_schema(conn: Connection) -> None:
    """The newest schema on an empty database, as `Base.metadata.create_all` makes it."""
    for statement in _schema_ddl(conn.dialect):
        conn.exec_driver_sql(statement)


def prepare() -> None:
    """Read the migrations and compile a new SQLite catalog's schema now: a process that
    forks servers (the tests' fork server) does it once instead of each server."""
    engine = create_engine("sqlite://")
    with engine.connect() as conn:
        _schema_ddl(conn.dialect)
    engine.dispose()
    _scripts().revision_map.get_current_head()


def migrate(conn: Connection, url: URL, shown: str) -> None:
    """Upgrade the schema to the newest revision, refusing one newer than this code. An
    empty database gets the newest schema at once, from the models, stamped with the head
    revision: replaying every migration did the same in twice the time (tests/test_catalog.py
    checks that both build the same schema)."""
    cfg = alembic_config(url)
    cfg.attributes["connection"] = conn
    context = MigrationContext.configure(conn)
    current = context.get_current_revision()
    scripts = _scripts()
    if current is None and not inspect(conn).get_table_names():
        create_schema(conn)
        context.stamp(scripts, "head")
        return
    if current is not None:
        try:
            scripts.get_revision(current)
        except CommandError:
            raise CatalogError(f"the catalog at {shown} has schema revision {current!r}, "
                               "made by a newer Strata than this one (which knows up to "
                               f"{scripts.get_current_head()!r}): upgrade Strata") from None
    command.upgrade(cfg, "head")


def open_catalog(url: str) -> tuple[Engine, sessionmaker]:
    """Connect (SQLite file by default, PostgreSQL by URL) and migrate to the newest schema."""
    target, shown = catalog_url(url), redact(url)
    engine = create_catalog_engine(target)
    try:
        try:
            conn = engine.connect()
        except SQLAlchemyError as exc:
            raise CatalogError(f"cannot connect to the catalog at {shown}: "
                               f"{db_reason(exc)}") from None
        with conn, conn.begin():
            try:
                if target.get_backend_name() == "postgresql":
                    _check_postgresql(conn, shown)
                migrate(conn, target, shown)
            except SQLAlchemyError as exc:
                raise CatalogError(f"cannot set up the catalog at {shown}: "
                                   f"{db_reason(exc)}") from None
    except BaseException:
        engine.dispose()
        raise
    return engine, sessionmaker(engine, expire_on_commit=False)

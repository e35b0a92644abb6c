"""The catalog on SQLite and PostgreSQL: one set of migrations that goes up and down on both,
models that match what the migrations build, values accepted and refused alike on both,
times always in UTC, and a server that says in one line why it cannot use a catalog."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, text, update
from sqlalchemy.exc import OperationalError, StatementError

from pg_fixture import PASSWORD, PgCluster
from server_fixtures import assert_one_line_error, free_port, strata
from strata.server.catalog.db import (
    CatalogError,
    alembic_config,
    catalog_url,
    create_catalog_engine,
    open_catalog,
)
from strata.server.catalog.models import AuditEntry, Base, EnrollmentToken, Transaction
from strata.server.catalog.models import Endpoint as EndpointRow
from strata.server.catalog.types import CatalogValueError

pytestmark = pytest.mark.e2e


def engine_for(url: str) -> Engine:
    return create_catalog_engine(catalog_url(url))


def run_alembic(engine: Engine, url: str, action: str, revision: str) -> None:
    with engine.begin() as conn:
        cfg = alembic_config(catalog_url(url))
        cfg.attributes["connection"] = conn
        getattr(command, action)(cfg, revision)


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


# -- migrations ------------------------------------------------------------------------------


def test_migrations_go_down_to_nothing_and_back_up(catalogs, tmp_path):
    url = catalogs.url(tmp_path)
    engine = engine_for(url)
    try:
        run_alembic(engine, url, "upgrade", "0001")
        with engine.begin() as conn:  # a row from before 0002, which adds a column to it
            conn.execute(text(
                "INSERT INTO endpoints (id, hostname, os, state, credential_hash, enrolled_at,"
                " last_ip, inventory, bytes_received, bytes_sent) VALUES ('ep-old', 'h', "
                "'linux', 'active', 'c', :now, '', '{}', 0, 0)"), {"now": datetime.now(UTC)})
        run_alembic(engine, url, "upgrade", "head")
        with engine.connect() as conn:
            tags = conn.execute(select(EndpointRow.tags).where(EndpointRow.id == "ep-old"))
            assert tags.scalar_one() == []  # the old row got the new column's default
        assert table_names(engine) == set(Base.metadata.tables) | {"alembic_version"}

        run_alembic(engine, url, "downgrade", "base")
        assert table_names(engine) == {"alembic_version"}

        run_alembic(engine, url, "upgrade", "head")
        assert table_names(engine) == set(Base.metadata.tables) | {"alembic_version"}
    finally:
        engine.dispose()


def test_models_match_the_migrated_schema(catalogs, tmp_path):
    url = catalogs.url(tmp_path)
    engine, _ = open_catalog(url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(
                conn, opts={"compare_type": True}), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()


def schema(engine: Engine) -> dict[str, object]:
    """Everything the database says about each table: columns (type, nullability, server
    default), primary key, foreign keys, indexes and unique constraints."""
    insp = inspect(engine)
    tables: dict[str, object] = {}
    for table in sorted(insp.get_table_names()):
        if table == "alembic_version":
            continue

        def named(items: list[dict]) -> list[tuple]:
            return sorted(tuple(sorted((k, str(v)) for k, v in item.items()
                                       if k not in ("name", "dialect_options")))
                          for item in items)

        tables[table] = {
            # In name order: a migration adds its columns at the end of the table.
            "columns": sorted((c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                              for c in insp.get_columns(table)),
            "primary key": insp.get_pk_constraint(table)["constrained_columns"],
            "foreign keys": named(insp.get_foreign_keys(table)),
            "indexes": named(insp.get_indexes(table)),
            "unique": named(insp.get_unique_constraints(table)),
        }
    return tables


def test_a_new_catalog_has_the_schema_the_migrations_build(catalogs, tmp_path):
    """open_catalog makes an empty database's schema from the models at once; replaying
    every migration must build exactly the same one (column for column, with the server
    defaults migrations give rows that exist already), stamped with the same revision."""
    replayed_url, created_url = catalogs.url(tmp_path / "a"), catalogs.url(tmp_path / "b")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    replayed = engine_for(replayed_url)
    created, _ = open_catalog(created_url)
    try:
        run_alembic(replayed, replayed_url, "upgrade", "head")
        assert schema(created) == schema(replayed)
        assert len(schema(created)) == len(Base.metadata.tables)
        with replayed.connect() as a, created.connect() as b:
            assert MigrationContext.configure(b).get_current_revision() == \
                MigrationContext.configure(a).get_current_revision() is not None
    finally:
        replayed.dispose()
        created.dispose()


def test_opening_twice_leaves_the_schema_as_it_is(catalogs, tmp_path):
    url = catalogs.url(tmp_path)
    for _ in range(2):
        engine, sessions = open_catalog(url)
        with sessions() as db:
            db.add(AuditEntry(actor="admin", action="test"))
            db.commit()
        engine.dispose()
    engine, sessions = open_catalog(url)
    with sessions() as db:
        assert len(list(db.scalars(select(AuditEntry)))) == 2
    engine.dispose()


def test_a_schema_newer_than_the_code_is_refused_in_one_line(catalogs, tmp_path):
    url = catalogs.url(tmp_path)
    engine, _ = open_catalog(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(CatalogError, match="revision '9999', made by a newer Strata"):
        open_catalog(url)


def test_two_servers_starting_on_a_new_database_both_migrate(pg_cluster: PgCluster):
    """A race of first starts, in separate processes like real servers: the later ones wait
    for the first's migration, then find the schema up to date (without the lock, they
    create the same tables at once and all but one fail). Six children forked from one
    interpreter that imported the catalog code, released together."""
    url = pg_cluster.new_database()
    code = """
import os, sys
from strata.server.catalog.db import open_catalog
go_read, go_write = os.pipe()
pids = []
for _ in range(6):
    pid = os.fork()
    if pid == 0:
        os.close(go_write)
        os.read(go_read, 1)  # all six wait here, then start at once
        try:
            open_catalog(sys.argv[1])[0].dispose()
        except BaseException as exc:
            print(f"{type(exc).__name__}: {exc}", flush=True)
            os._exit(1)
        os._exit(0)
    pids.append(pid)
os.close(go_read)
os.close(go_write)  # end of file: every child's read returns
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
print(codes)
sys.exit(1 if any(codes) else 0)
"""
    proc = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert proc.stdout.strip().endswith("[0, 0, 0, 0, 0, 0]"), proc.stdout


def test_a_pooled_connection_the_database_dropped_is_replaced_before_use(pg_cluster,
                                                                         monkeypatch):
    """A connection that sat in the pool is pinged when taken (not one used a moment
    ago: that round trip cost every catalog read of a check-in); one the database closed
    meanwhile (a restart) is replaced, and the request that takes it never sees it."""
    from strata.server.catalog import db as catalog_db

    url = pg_cluster.new_database()
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        pg_cluster.execute(f"SELECT pg_terminate_backend({pid})")
        monkeypatch.setattr(catalog_db, "PING_IDLE_SECONDS", 0.0)  # it idled long enough
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != pid
        monkeypatch.setattr(catalog_db, "PING_IDLE_SECONDS", 3600.0)  # in use just now
        with engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        pg_cluster.execute(f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(OperationalError), engine.connect() as conn:
            conn.execute(text("SELECT 1"))  # not pinged: the dead one is used (and dropped)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()


# -- the same values on both databases -------------------------------------------------------


@pytest.fixture(scope="module")
def catalog(catalogs, tmp_path_factory):
    """One catalog per database for the tests below (a new one each costs a second or
    two): each adds rows with keys of its own, and a refused row is never added."""
    engine, sessions = open_catalog(catalogs.url(tmp_path_factory.mktemp("values")))
    add(sessions, EndpointRow(id="seed", credential_hash="seed"))
    yield sessions
    engine.dispose()


def add(sessions, *rows) -> None:
    with sessions() as db:
        db.add_all(rows)
        db.commit()


def test_times_come_back_aware_and_in_utc(catalog):
    when = datetime(2026, 3, 29, 1, 30, tzinfo=timezone(timedelta(hours=5)))
    add(catalog, EnrollmentToken(token_hash="t" * 64, expires_at=when))
    mine = EnrollmentToken.token_hash == "t" * 64
    with catalog() as db:
        got = db.scalar(select(EnrollmentToken.expires_at).where(mine))
        assert got == when and got.tzinfo is UTC and got.hour == 20
        # Comparisons in SQL see the same instant whatever zone the bound value is in.
        assert db.scalar(select(EnrollmentToken.id).where(
            mine, EnrollmentToken.expires_at < when.astimezone(UTC) + timedelta(seconds=1)))
        assert not db.scalar(select(EnrollmentToken.id).where(
            mine, EnrollmentToken.expires_at < when.astimezone(UTC)))
        assert db.scalar(select(EnrollmentToken.created_at).where(mine)).tzinfo is UTC


def test_a_naive_time_is_refused(catalog):
    with pytest.raises(StatementError, match="naive datetime"):
        add(catalog, EnrollmentToken(token_hash="n" * 64, expires_at=datetime(2026, 1, 1)))


@pytest.mark.parametrize("row", [
    pytest.param(lambda: EnrollmentToken(token_hash="x" * 65), id="string-too-long"),
    pytest.param(lambda: EnrollmentToken(token_hash="a\x00b"), id="nul-character"),
    pytest.param(lambda: EnrollmentToken(token_hash="\ud800"), id="lone-surrogate"),
    pytest.param(lambda: EnrollmentToken(token_hash="u", uses_left=1 << 31), id="int32"),
    pytest.param(lambda: EndpointRow(id="big", credential_hash="big", bytes_sent=1 << 63),
                 id="int64"),
    pytest.param(lambda: EndpointRow(id="nan", credential_hash="nan",
                                     inventory={"x": float("nan")}), id="json-nan"),
    pytest.param(lambda: Transaction(endpoint_id="seed", kind="restore",
                                     seconds=float("inf")), id="float-inf"),
])
def test_values_postgresql_refuses_are_refused_on_both(catalog, row):
    with pytest.raises(StatementError) as caught:
        add(catalog, row())
    assert isinstance(caught.value.orig, CatalogValueError)


def test_descriptive_text_is_clipped_not_refused(catalog):
    add(catalog, EndpointRow(id="clip", credential_hash="clip", hostname="h" * 300 + "\x00",
                             os="linux\x00\ud800"),
        AuditEntry(actor="admin", action="clip-test", target=",".join(["x" * 36] * 10)))
    with catalog() as db:
        ep = db.get(EndpointRow, "clip")
        assert ep.hostname == "h" * 255
        assert ep.os == "linux\ufffd?"
        assert len(db.scalar(select(AuditEntry.target).where(
            AuditEntry.action == "clip-test"))) == 128
        # Bulk updates (the check-in timestamps) go through the same types.
        db.execute(update(EndpointRow), [{"id": "clip", "last_ip": "1" * 100}])
        db.commit()
        assert db.scalar(select(EndpointRow.last_ip).where(EndpointRow.id == "clip")) \
            == "1" * 64


# -- a catalog that cannot be used: one line, never a password ------------------------------


def refusal(url: str) -> str:
    with pytest.raises(CatalogError) as caught:
        open_catalog(url)
    message = str(caught.value)
    assert "\n" not in message and PASSWORD not in message and "hunter2" not in message
    return message


@pytest.mark.parametrize("catalog, needle", [
    ("mysql://admin:hunter2@db/strata", "unsupported catalog database 'mysql' in "
     "mysql://admin:***@db/strata"),
    ("no url at all", "not a catalog URL"),
    ("postgresql://admin:hunter2@[::1", "not a catalog URL: 'postgresql://admin:***@[::1'"),
    ("sqlite://", "an SQLite catalog needs a file"),
    ("sqlite:////nonexistent-dir/catalog.sqlite", "cannot connect to the catalog at "
     "sqlite:////nonexistent-dir/catalog.sqlite: unable to open database file"),
])
def test_unusable_catalog_urls_are_refused_in_one_line(catalog, needle):
    assert needle in refusal(catalog)


def test_unreachable_postgresql_is_refused_in_one_line(pg_cluster):
    closed = free_port()
    good = pg_cluster.new_database()
    assert refusal(f"postgresql://strata:{PASSWORD}@127.0.0.1:{closed}/x") == (
        f"cannot connect to the catalog at postgresql://strata:***@127.0.0.1:{closed}/x: "
        "connection refused")
    assert refusal(good.replace(PASSWORD, "not-" + PASSWORD)).endswith(
        'password authentication failed for user "strata"')
    assert refusal(good.rsplit("/", 1)[0] + "/missing").endswith(
        'database "missing" does not exist')


def test_a_database_the_role_may_not_change_is_refused(pg_cluster):
    url = pg_cluster.new_database()
    name = url.rsplit("/", 1)[1]
    pg_cluster.execute(f"ALTER DATABASE {name} OWNER TO postgres")
    pg_cluster.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC", dbname=name)
    message = refusal(url)
    assert message.startswith("cannot set up the catalog at") and "permission denied" in message


def test_a_database_not_in_utf8_is_refused(pg_cluster):
    name = "latin1_catalog"
    pg_cluster.execute(f"CREATE DATABASE {name} OWNER strata ENCODING 'LATIN1' "
                       "LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    assert "uses the LATIN1 encoding; Strata needs UTF8" in refusal(pg_cluster.url(name))


def test_strata_server_prints_one_line_for_an_unreachable_catalog(tmp_path):
    """The command itself: no traceback, exit 2, the password masked. Needs no PostgreSQL:
    the port is closed. (`postgres://`, the short form, is accepted as `postgresql://`.)"""
    port, scheme = free_port(), "postgres"
    proc = strata("server", "--data", tmp_path / "data", "--listen", f"127.0.0.1:{free_port()}",
                  "--catalog", f"{scheme}://strata:hunter2@127.0.0.1:{port}/strata",
                  rc=None, timeout=120)
    assert_one_line_error(proc, f"error: cannot connect to the catalog at {scheme}://"
                          f"strata:***@127.0.0.1:{port}/strata: connection refused")
    assert "hunter2" not in proc.stderr + proc.stdout

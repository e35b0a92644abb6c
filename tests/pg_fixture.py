"""A throw-away PostgreSQL cluster for the tests, from Debian's `postgresql` package.

`initdb` and `pg_ctl` run in a temporary directory as the `postgres` user (the tests run as
root, and PostgreSQL refuses to run as root), listening on a free loopback port and on a
Unix socket in that directory. The cluster lives for the whole session; every server under
test gets a fresh database in it, owned by a password-protected role, so that the URLs the
tests use look like an administrator's.

Without the package the PostgreSQL variants are skipped, unless STRATA_REQUIRE_POSTGRES is
set (CI sets it): then a missing or broken PostgreSQL fails them.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROLE = "strata"
PASSWORD = "pg-test-secret"  # the tests check that no message ever shows it
SERVICE_USER = "postgres"
REQUIRE_ENV = "STRATA_REQUIRE_POSTGRES"


def find_pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian keeps it off PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_orphans(bin_dir: Path) -> None:
    """Stop and delete clusters left by test runs that were killed before their teardown
    (a postmaster outlives the process that started it)."""
    for base in glob.glob(os.path.join(tempfile.gettempdir(), "strata-pg-*")):
        try:
            os.kill(int(Path(base, "owner.pid").read_text()), 0)
            continue  # its run is still going
        except ProcessLookupError:
            PgCluster(bin_dir, Path(base)).stop()
        except (OSError, ValueError):
            continue  # not one of ours, or not ours to judge


class PgCluster:
    """A running cluster: `new_database()` hands out a fresh database's URL."""

    def __init__(self, bin_dir: Path, base: Path | None = None):
        """A new cluster directory, or (`base`) one a killed run left behind."""
        self.bin = bin_dir
        self.base = base or Path(tempfile.mkdtemp(prefix="strata-pg-"))
        if base is None:
            (self.base / "owner.pid").write_text(str(os.getpid()))
        self.data = self.base / "data"
        self.socket_dir = self.base
        self.port = _free_port()
        self.log = self.base / "postgres.log"
        self._names = itertools.count(1)
        self._as_service_user: list[str] = []
        self._create_strategy = ""
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam(SERVICE_USER)
            except KeyError:
                raise RuntimeError(f"PostgreSQL is installed but there is no {SERVICE_USER!r} "
                                   "user to run it as") from None
            if base is None:
                os.chown(self.base, pw.pw_uid, pw.pw_gid)
            self._as_service_user = ["runuser", "-u", SERVICE_USER, "--"]

    def _run(self, *args: str) -> None:
        proc = subprocess.run([*self._as_service_user, *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}{log}")

    def start(self) -> PgCluster:
        # Password (SCRAM) over TCP, as a real deployment would; trust on the private socket
        # for the fixture's own superuser work. UTF-8 and C collation: see docs/deployment.md.
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", SERVICE_USER,
                  "--encoding=UTF8", "--locale=C", "--no-sync", "--auth-local=trust",
                  "--auth-host=scram-sha-256")
        # Durability is pointless for a cluster deleted at the end: fsync off saves seconds.
        options = (f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=300 -c shared_buffers=32MB")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                  "-o", options, "-w", "-t", "60", "start")
        self.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
        version = int(self.execute("SHOW server_version_num")[0])  # type: ignore[index]
        # New databases copied as files, not written block by block to the WAL (the default
        # since PostgreSQL 15, which added the choice): 28 ms instead of 45 here.
        self._create_strategy = " STRATEGY = FILE_COPY" if version >= 150000 else ""
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                          "-w", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.base, ignore_errors=True)

    def execute(self, sql: str, dbname: str = "postgres") -> tuple | None:
        """Run one statement as the superuser, over the Unix socket, outside a transaction;
        its first row, if it returns rows."""
        import psycopg

        with psycopg.connect(host=str(self.socket_dir), port=self.port, user=SERVICE_USER,
                             dbname=dbname, autocommit=True) as conn:
            cur = conn.execute(sql)  # type: ignore[arg-type]
            return cur.fetchone() if cur.description is not None else None

    def url(self, dbname: str, password: str = PASSWORD) -> str:
        return f"postgresql://{ROLE}:{password}@127.0.0.1:{self.port}/{dbname}"

    def new_database(self, prefix: str = "catalog") -> str:
        """A new empty database owned by the test role; its URL (password included)."""
        name = f"{prefix}_{next(self._names)}"
        self.execute(f"CREATE DATABASE {name} OWNER {ROLE}{self._create_strategy}")
        return self.url(name)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    bin_dir = find_pg_bin()
    if bin_dir is None:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{REQUIRE_ENV} is set but PostgreSQL is not installed "
                        "(no /usr/lib/postgresql/*/bin/initdb)")
        pytest.skip("PostgreSQL is not installed (Debian package `postgresql`); "
                    f"with {REQUIRE_ENV}=1 (as in CI) this fails instead")
    stop_orphans(bin_dir)
    cluster = PgCluster(bin_dir)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


class Catalogs:
    """Fresh catalogs of one kind: `new()` is '' for SQLite (the server's default file in
    its data directory) or the URL of a new PostgreSQL database."""

    def __init__(self, kind: str, cluster: PgCluster | None):
        self.kind = kind
        self.cluster = cluster

    def new(self) -> str:
        return self.cluster.new_database() if self.cluster else ""

    def url(self, data_dir: Path) -> str:
        """A concrete URL (for tests that open the catalog themselves)."""
        return self.new() or f"sqlite:///{data_dir / 'catalog.sqlite'}"


# The PostgreSQL variant starts a cluster, asked for lazily below, so the tier hook in
# conftest.py cannot see it among a test's fixtures: the parameter carries the mark.
@pytest.fixture(scope="module",
                params=["sqlite", pytest.param("postgresql", marks=pytest.mark.e2e)])
def catalogs(request: pytest.FixtureRequest) -> Catalogs:
    """Parametrizes a module over both catalog databases; the PostgreSQL cluster is only
    started when a PostgreSQL variant runs."""
    cluster = request.getfixturevalue("pg_cluster") if request.param == "postgresql" else None
    return Catalogs(request.param, cluster)

"""Shared fixtures: run the `strata` CLI, generate and compare trees, age and damage packs."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import cost_factors
from cli_forkserver import end_shared_fork_server, fork_server, share_fork_servers
from generated_trees import word_text, words_by_byte

# The catalog fixtures live here, not imported by each module: one PostgreSQL cluster a session.
from pg_fixture import catalogs, pg_cluster  # noqa: F401
from strata.engine.backup import BackupResult, backup
from strata.engine.restore import RestoreResult, restore
from strata.store.repository import Store

cost_factors.lower(server=True)  # see tests/cost_factors.py

STRATA = Path(sys.executable).parent / "strata"
SMALL_PACK = 256 << 10
PASSPHRASE = "correct horse battery staple"


# -- tiers ------------------------------------------------------------------------------------

# A test that needs one of these starts a service of its own (a PostgreSQL cluster, an S3
# server): it belongs to the end-to-end tier, whatever its module.
SERVICE_FIXTURES = {"pg_cluster", "s3"}


# -- scheduling --------------------------------------------------------------------------------

# `make test` hands whole modules to its workers (`--dist loadscope`), in collection order
# (`--no-loadscope-reorder`), which this list sets: the long modules first (a module of two
# minutes started last keeps one worker busy alone at the end), and those that mostly
# wait (on a throttled link, an outage, a timer: `W` below, 5-25% of one core) spread
# among those that use the CPU, so that no more than three wait at once. With the four
# waiting modules started together, both cores sat 18% idle for 40 s of every run. The
# wall seconds are those of a fresh-clone run at de772ea (tests/cpu_report.py); only the
# order depends on them: a module missing here runs after these, a stale figure costs a
# little time, never a result.
SCHEDULE = [
    "test_wan_netns.py",  # W 172 s
    "test_readme_walk.py",  # 35
    "test_pipelined_restore.py",  # W 92
    "test_console.py",  # 53
    "test_crash_safety.py",  # 23
    "test_reflector_netns.py",  # W 54
    "test_layers.py",  # 21
    "test_server_fleet.py",  # 28
    "test_layer_power_loss.py",  # 31
    "test_reflector.py",  # W 63
    "test_agent_daemon.py",  # 17
    "test_scale_out.py",  # W 67
    "test_agent_resilience.py",  # 35
    "test_fuzz_decoders.py",  # 43
    "test_store_s3.py",  # 29
    "test_accounts.py",  # 28
    "test_isolation.py",  # 25
    "test_validation.py",  # 24
    "test_server_security.py",  # 20
    "test_catalog.py",  # 19
    "test_apply_journal.py",  # 17
    "test_layer_download.py",  # 16
    "test_manifest_wire.py",  # 16
    "test_resume.py",  # 15
    "test_signed_layers.py",  # 14
    "test_snapshot_files.py",  # 14
    "test_users_roles.py",  # 13
    "test_clone_wire.py",  # 13
    "test_retention.py",  # 13
]
_RANK = {name: i for i, name in enumerate(SCHEDULE)}


def _rank(item: pytest.Item) -> int:
    return _RANK.get(item.path.name, len(SCHEDULE))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tier the tests: `e2e` marks those that run real processes (servers, agents, CLIs,
    databases), set per module with `pytestmark` or found here from the fixtures a test
    uses; `make test-fast` runs the rest, `make test` runs all. Then order the modules as
    SCHEDULE says; a stable sort keeps each module's own order."""
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
    items.sort(key=_rank)


# -- one fork server a session ------------------------------------------------------------------

_shared_forks = ""


def pytest_configure(config: pytest.Config) -> None:
    """In the session's first process (not in an xdist worker): the folder of the fork
    server every worker shares (tests/cli_forkserver.py), before the workers start."""
    global _shared_forks
    if not hasattr(config, "workerinput"):
        _shared_forks = share_fork_servers()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _shared_forks:
        end_shared_fork_server(_shared_forks)


# -- memory -----------------------------------------------------------------------------------

# A worker imports the product and every test module before its first test: about a
# million objects that live until the end. Python's cyclic GC walked all of them at each
# full collection (a fifth of a worker's collection CPU, 8% of its tests'). Collection
# runs without it; what it built is then frozen, out of every later collection's walk,
# without a collection first (0.4-1 CPU s a worker, to free the few cycles imports leave).
@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> object:
    gc.disable()
    try:
        return (yield)
    finally:
        gc.freeze()
        gc.enable()


# -- the CLI --------------------------------------------------------------------------------


class Cli:
    """Runs `strata store …` as a real subprocess (no progress bars, no inherited secrets)."""

    def __init__(self, cwd: Path):
        self.cwd = cwd

    def env(self, passphrase: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("STRATA_") and k not in ("COLUMNS", "LINES")}
        env["STRATA_NO_PROGRESS"] = "1"
        if passphrase is not None:
            env["STRATA_PASSPHRASE"] = passphrase
        return env

    def argv(self, args: tuple) -> list[str]:
        return [str(STRATA), "store", *(str(a) for a in args)]

    def run(self, *args: object, passphrase: str | None = None, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        forks = fork_server()
        if forks is not None:  # the same process boundaries, without re-importing the CLI
            return forks.run(self.argv(args)[1:], env or self.env(passphrase), timeout,
                             cwd=str(self.cwd), errors="surrogateescape")
        return subprocess.run(self.argv(args), cwd=self.cwd, env=env or self.env(passphrase),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors="surrogateescape", timeout=timeout)

    def ok(self, *args: object, passphrase: str | None = None) -> str:
        proc = self.run(*args, passphrase=passphrase)
        assert proc.returncode == 0, (args, proc.returncode, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc.stdout

    def json(self, *args: object, passphrase: str | None = None, rc: int = 0) -> object:
        proc = self.run(*args, "--json", passphrase=passphrase)
        assert proc.returncode == rc, (args, proc.returncode, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        return json.loads(proc.stdout)

    def start(self, *args: object, passphrase: str | None = None) -> Any:
        """`strata store ARGS` started (a Popen, or its forked likeness), text output."""
        forks = fork_server()
        if forks is not None:
            return forks.popen(self.argv(args)[1:], self.env(passphrase), str(self.cwd))
        return subprocess.Popen(self.argv(args), cwd=self.cwd, env=self.env(passphrase),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace")

    def snapshot_ids(self, store: Path, passphrase: str | None = None) -> list[str]:
        return [s["id"] for s in self.json("snapshots", store, passphrase=passphrase)]


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


# -- trees ----------------------------------------------------------------------------------

WORDS = words_by_byte(("alpha", "beta", "gamma", "delta", "strata", "chunk", "pack", "index"))


def file_content(rng: random.Random, size: int) -> bytes:
    """Half random, half compressible text, so both zstd paths and dedup get exercised."""
    if size == 0:
        return b""
    random_part = rng.randbytes(size // 2)
    text = word_text(rng, WORDS, size // 8 + 2)
    return (random_part + text)[:size]


def write_file(path: Path, data: bytes, mtime_ns: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def make_tree(root: Path, seed: int, *, files: int = 120, dirs: int = 8,
              sizes: tuple[int, ...] = (0, 700, 4_000, 20_000, 70_000, 150_000)) -> Path:
    """A deterministic tree of `files` files spread over `dirs` (nested) directories."""
    rng = random.Random(seed)
    dirnames = [Path(".")]
    for i in range(dirs):
        dirnames.append(rng.choice(dirnames) / f"dir{i:02d}")
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        write_file(root / rng.choice(dirnames) / f"file{i:04d}.dat",
                   file_content(rng, rng.choice(sizes)))
    return root


def mutate_tree(root: Path, rng: random.Random, *, rewrite: int = 6, add: int = 2,
                remove: int = 1) -> None:
    """Rewrite, add and delete a few files (sizes change so the files cache sees it)."""
    existing = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    for p in rng.sample(existing, min(rewrite, len(existing))):
        write_file(p, file_content(rng, rng.choice((3_000, 30_000, 90_000)) + rng.randrange(99)))
    for p in rng.sample(existing, min(remove, len(existing))):
        p.unlink(missing_ok=True)
    for _ in range(add):
        write_file(root / f"added-{rng.randrange(1 << 30):08x}.dat",
                   file_content(rng, rng.choice((500, 40_000, 200_000))))


def tree_state(root: Path) -> dict:
    """Everything a restore must reproduce, per relative path (bytes), plus hardlink groups."""
    root_b = os.fsencode(root)
    entries: dict[bytes, tuple] = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}

    def walk(rel: bytes) -> None:
        base = os.path.join(root_b, rel) if rel else root_b
        for name in sorted(os.listdir(base)):
            r = rel + b"/" + name if rel else name
            full = os.path.join(root_b, r)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            extra: object = None
            if stat.S_ISREG(kind):
                with open(full, "rb") as f:
                    extra = hashlib.sha256(f.read()).hexdigest()
                if st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), []).append(r)
            elif stat.S_ISLNK(kind):
                extra = os.readlink(full)
            xattrs = () if stat.S_ISLNK(kind) else tuple(sorted(
                (k, os.getxattr(full, k)) for k in os.listxattr(full)))
            entries[r] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                          st.st_size if stat.S_ISREG(kind) else None, extra, xattrs)
            if stat.S_ISDIR(kind):
                walk(r)

    walk(b"")
    links = sorted(sorted(group) for group in inodes.values() if len(group) > 1)
    return {"entries": entries, "hardlinks": links}


def assert_same_state(got: dict, want: dict) -> None:
    assert sorted(got["entries"]) == sorted(want["entries"])
    for path, entry in want["entries"].items():
        assert got["entries"][path] == entry, path
    assert got["hardlinks"] == want["hardlinks"]


@pytest.fixture
def trees() -> SimpleNamespace:
    """make_tree / mutate_tree / tree_state / assert_same_state / file_content, as one kit."""
    return SimpleNamespace(**{fn.__name__: fn for fn in (
        make_tree, mutate_tree, tree_state, assert_same_state, file_content, write_file)})


# -- stores ---------------------------------------------------------------------------------


def pack_paths(store_dir: Path) -> list[Path]:
    return sorted(p for p in (store_dir / "packs").rglob("*")
                  if p.is_file() and not p.name.startswith("."))


def age_packs(store_dir: Path, seconds: float = 3600) -> None:
    """Backdate every pack, as if the backups that wrote them ran `seconds` ago.

    While a writer session is live, prune leaves alone packs written less than a minute
    before it began; tests racing prune against a backup age the older packs first.
    """
    when = time.time() - seconds
    for p in pack_paths(store_dir):
        os.utime(p, (when, when))


def lib_backup(store_dir: Path, source: Path, passphrase: str | None = None,
               **kw: object) -> BackupResult:
    with Store.open(store_dir, passphrase) as store:
        return backup(store, source, **kw)


def lib_restore(store_dir: Path, sid: str, target: Path,
                passphrase: str | None = None) -> RestoreResult:
    with Store.open(store_dir, passphrase) as store:
        return restore(store, store.resolve_snapshot(sid), target)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


@pytest.fixture
def new_store(tmp_path: Path) -> Callable[..., Path]:
    """Create a store (small packs by default) under tmp_path and return its directory."""

    def make(name: str = "store", *, pack_size: int = SMALL_PACK,
             passphrase: str | None = None) -> Path:
        Store.init(tmp_path / name, pack_size=pack_size, passphrase=passphrase).close()
        return tmp_path / name

    return make


@pytest.fixture
def stores() -> SimpleNamespace:
    """pack_paths / age_packs / lib_backup / lib_restore / flip_byte, as one kit."""
    return SimpleNamespace(**{fn.__name__: fn for fn in (
        pack_paths, age_packs, lib_backup, lib_restore, flip_byte)})


# -- an S3-compatible object store ------------------------------------------------------------


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """moto's S3 server on a loopback port, started once for the tests that use it."""
    from s3_fixtures import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log").start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3) -> Iterator[str]:
    """A new, empty bucket of this test's own, emptied and removed after it."""
    name = s3.new_bucket()
    yield name
    s3.drop_bucket(name)

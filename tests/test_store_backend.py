"""The store on its `Backend` contract: the contract kept by the local directory, an
in-memory object store and S3 (moto's server on loopback), and a whole store life
(backup, restore, check --read-data, prune) on the in-memory one and on S3, whose objects
never touch the local disk."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from strata.engine import prune as prune_mod
from strata.engine.backup import backup
from strata.engine.check import check
from strata.engine.restore import restore
from strata.store import blockcache
from strata.store.backend import KINDS, Backend, LocalBackend, ObjectInfo, ObjectNotFound
from strata.store.blockcache import BlockCache
from strata.store.repository import Store


class MemoryBackend:
    """An object store in a dict, as an S3 bucket would be for the store: no rename, no
    path, whole-object writes; `save_file` uploads the finished file and removes it."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], tuple[bytes, float]] = {}
        self.lock = threading.Lock()
        self.ranged_reads = 0

    def _key(self, kind: str, name: str) -> tuple[str, str]:
        assert kind in KINDS and name and "/" not in name, (kind, name)
        return kind, name

    def save(self, kind: str, name: str, data: bytes) -> None:
        with self.lock:
            self.objects[self._key(kind, name)] = (bytes(data), time.time())

    def save_file(self, kind: str, name: str, path: Path) -> None:
        self.save(kind, name, path.read_bytes())
        path.unlink()

    def load(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes:
        with self.lock:
            try:
                data, _ = self.objects[self._key(kind, name)]
            except KeyError:
                raise ObjectNotFound(f"{kind}/{name} is missing") from None
            if length is not None:
                self.ranged_reads += 1
        return data[offset:] if length is None else data[offset:offset + length]

    def stat(self, kind: str, name: str) -> ObjectInfo:
        with self.lock:
            try:
                data, mtime = self.objects[self._key(kind, name)]
            except KeyError:
                raise ObjectNotFound(f"{kind}/{name} is missing") from None
        return ObjectInfo(len(data), mtime)

    def exists(self, kind: str, name: str) -> bool:
        with self.lock:
            return self._key(kind, name) in self.objects

    def list(self, kind: str) -> Iterator[str]:
        with self.lock:
            names = sorted(n for k, n in self.objects if k == kind)
        yield from names

    def remove(self, kind: str, name: str) -> None:
        with self.lock:
            self.objects.pop(self._key(kind, name), None)

    def remove_many(self, kind: str, names: Iterable[str]) -> None:
        for name in names:
            self.remove(kind, name)

    def close(self) -> None:
        pass


class RangedReads:
    """Wraps any backend and counts the loads of a byte range (restic's habit: what is not
    the backend's job wraps its contract)."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.ranged_reads = 0

    def load(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if length is not None:
            self.ranged_reads += 1
        return self.inner.load(kind, name, offset, length)

    def __getattr__(self, attr: str) -> object:
        return getattr(self.inner, attr)


def make_backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if kind == "local":
        return LocalBackend(tmp_path / "objects")
    if kind == "memory":
        return MemoryBackend()
    if kind == "cached":  # tiny blocks: most ranges straddle two
        return BlockCache(MemoryBackend(), block_size=4096, blocks=4)
    s3 = request.getfixturevalue("s3")
    # As a store on S3 is opened (store/location.py): behind the block cache.
    return BlockCache(s3.backend(request.getfixturevalue("s3_bucket")))


# -- the contract, kept by all ------------------------------------------------------------


# The S3 variants start a server (moto's): they belong to the end-to-end tier, and
# conftest.py cannot see the fixture they take at run time, so the parameter carries the mark.
S3 = pytest.param("s3", marks=pytest.mark.e2e)


@pytest.fixture(params=["local", "memory", "cached", S3])
def backend(request, tmp_path) -> Iterator[Backend]:
    b = make_backend(request.param, request, tmp_path)
    yield b
    b.close()


@pytest.fixture(params=["memory", S3])
def object_store(request, tmp_path) -> Iterator[RangedReads]:
    """An object store (no local directory of objects) that counts its ranged reads."""
    b = make_backend(request.param, request, tmp_path)
    yield RangedReads(b)
    b.close()


def test_objects_read_back_whole_and_in_ranges(backend, tmp_path):
    data = os.urandom(100_000)
    backend.save("packs", "ab" * 32, data)
    spool = tmp_path / "finished.tmp"
    spool.write_bytes(data[:500])
    backend.save_file("snapshots", "cd" * 32, spool)
    assert not spool.exists(), "save_file consumes the finished file"
    assert backend.load("packs", "ab" * 32) == data
    assert backend.load("packs", "ab" * 32, 99_990) == data[99_990:]
    assert backend.load("packs", "ab" * 32, 1_000, 4_096) == data[1_000:5_096]
    assert backend.load("packs", "ab" * 32, 99_000, 4_096) == data[99_000:]  # ends first
    assert backend.load("snapshots", "cd" * 32) == data[:500]
    info = backend.stat("packs", "ab" * 32)
    assert info.size == 100_000 and abs(info.mtime - time.time()) < 60
    assert list(backend.list("packs")) == ["ab" * 32]
    assert list(backend.list("keys")) == []
    assert backend.exists("snapshots", "cd" * 32)


def test_a_missing_object_is_reported_as_such(backend):
    backend.save("packs", "ab" * 32, b"x" * 10)
    backend.load("packs", "ab" * 32, 0, 5)
    backend.remove("packs", "ab" * 32)
    backend.remove("packs", "ab" * 32)  # removing what is gone is not an error
    for call in (lambda: backend.load("packs", "ab" * 32, 0, 5),
                 lambda: backend.load("snapshots", "ef" * 32),
                 lambda: backend.stat("packs", "ab" * 32)):
        with pytest.raises(ObjectNotFound):
            call()
    assert not backend.exists("packs", "ab" * 32)
    assert list(backend.list("packs")) == []


def test_many_objects_are_listed_in_name_order_and_removed_at_once(backend):
    names = sorted(os.urandom(32).hex() for _ in range(40))
    for name in names:
        backend.save("packs", name, name.encode())
    backend.save("snapshots", "ef" * 32, b"s")
    assert list(backend.list("packs")) == names
    backend.remove_many("packs", names[:30] + ["00" * 32])  # one never there
    assert list(backend.list("packs")) == names[30:]
    assert list(backend.list("snapshots")) == ["ef" * 32]
    backend.remove_many("packs", [])
    assert [backend.load("packs", n) for n in names[30:]] == [n.encode() for n in names[30:]]


# -- the local directory ---------------------------------------------------------------------


@pytest.mark.parametrize("kind,name", [("packs", "../x"), ("packs", ".hidden"),
                                       ("packs", ""), ("locks", "commit.lock"),
                                       ("index.sqlite", "x")])
def test_local_backend_refuses_names_outside_its_objects(tmp_path, kind, name):
    backend = LocalBackend(tmp_path)
    with pytest.raises(ValueError):
        backend.save(kind, name, b"x")
    assert list(tmp_path.iterdir()) == []


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_local_backend_keeps_a_bounded_number_of_packs_open(tmp_path):
    backend = LocalBackend(tmp_path, open_files=3)
    packs = {f"{i:02x}" * 32: os.urandom(5_000) for i in range(8)}
    for name, data in packs.items():
        backend.save("packs", name, data)
    before = open_fds()
    rng = random.Random(1)
    for _ in range(200):
        name = rng.choice(list(packs))
        off = rng.randrange(5_000)
        assert backend.load("packs", name, off, 100) == packs[name][off:off + 100]
        assert open_fds() - before <= 3
    for name in packs:
        backend.remove("packs", name)
    assert open_fds() == before, "removing a pack closes its descriptor"


def test_a_pack_evicted_while_a_thread_reads_it_stays_open_until_that_read_ends(tmp_path):
    """Closed at once, its descriptor number could be reused by the next open, and the
    read in flight would get another pack's bytes."""
    backend = LocalBackend(tmp_path, open_files=1)
    backend.save("packs", "aa" * 32, b"a" * 100)
    backend.save("packs", "bb" * 32, b"b" * 100)
    reading = backend._acquire("packs", "aa" * 32)  # a read in flight
    assert backend.load("packs", "bb" * 32, 0, 10) == b"b" * 10  # evicts "aa"
    assert os.pread(reading.fd, 10, 0) == b"a" * 10
    backend._release(reading)
    with pytest.raises(OSError):
        os.fstat(reading.fd)
    backend.close()


# -- the block cache in front of an object store --------------------------------------------


class CountedLoads(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.loads = 0
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def load(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes:
        with self.lock:
            self.loads += 1
        self.entered.set()
        self.release.wait()
        return super().load(kind, name, offset, length)


def test_block_cache_serves_neighbouring_chunks_from_one_request():
    inner = CountedLoads()
    data = os.urandom(1 << 20)
    cache = BlockCache(inner, block_size=256 << 10, blocks=8)
    cache.save("packs", "ab" * 32, data)
    got = [cache.load("packs", "ab" * 32, off, 8192) for off in range(0, 1 << 20, 8192)]
    assert b"".join(got) == data
    assert inner.loads == 4, "one request per 256 KiB block, not one per chunk"
    assert cache.load("packs", "ab" * 32) == data and inner.loads == 5, \
        "a whole object (check --read-data) is read from the store itself"
    cache.save("packs", "ab" * 32, data[:1000])  # written again (a test damaging it)
    assert cache.load("packs", "ab" * 32, 900, 200) == data[900:1000]


def test_block_cache_fetches_a_block_once_for_readers_asking_together(monkeypatch):
    waiting = threading.Semaphore(0)

    class Watched(blockcache._Fetch):
        __slots__ = ()

        def __init__(self) -> None:
            super().__init__()
            wait = self.done.wait
            self.done.wait = lambda timeout=None: (waiting.release(), wait(timeout))[1]

    monkeypatch.setattr(blockcache, "_Fetch", Watched)
    inner = CountedLoads()
    data = os.urandom(100_000)
    inner.save("packs", "cd" * 32, data)
    cache = BlockCache(inner, block_size=64 << 10)
    inner.release.clear()
    results: dict[int, bytes] = {}

    def read(i: int) -> None:
        results[i] = cache.load("packs", "cd" * 32, i * 1000, 1000)

    first = threading.Thread(target=read, args=(0,))
    first.start()
    assert inner.entered.wait(30)  # the first reader is fetching the block
    others = [threading.Thread(target=read, args=(i,)) for i in range(1, 8)]
    for t in others:
        t.start()
    for _ in others:  # every other reader waits for that fetch...
        assert waiting.acquire(timeout=30)
    inner.release.set()
    for t in [first, *others]:
        t.join(30)
    assert inner.loads == 1, "...instead of fetching the same block again"
    assert results == {i: data[i * 1000:(i + 1) * 1000] for i in range(8)}


# -- a whole store on an object store ----------------------------------------------------


def local_files(state_dir: Path) -> set[str]:
    return {str(p.relative_to(state_dir)) for p in state_dir.rglob("*") if p.is_file()}


def held_kinds(objects: Backend) -> set[str]:
    return {k for k in KINDS if k != "config" and any(True for _ in objects.list(k))} | (
        {"config"} if objects.exists("config", "config") else set())


@pytest.mark.parametrize("passphrase", [None, "pw"], ids=["plain", "encrypted"])
def test_a_store_on_an_object_store_backs_up_restores_checks_and_prunes(
        tmp_path, trees, passphrase, object_store):
    objects = object_store
    state = tmp_path / "state"
    src = trees.make_tree(tmp_path / "src", seed=21, files=60, dirs=4)
    first_state = trees.tree_state(src)
    with Store.init_on(objects, state, pack_size=256 << 10, passphrase=passphrase) as store:
        first = backup(store, src)
        trees.mutate_tree(src, random.Random(21), rewrite=20, add=3, remove=5)
        second_state = trees.tree_state(src)
        second = backup(store, src)
        assert second.files_unmodified > 0 and second.chunks_new > 0

        assert restore(store, store.resolve_snapshot(first.snapshot), tmp_path / "r1").errors == []
        trees.assert_same_state(trees.tree_state(tmp_path / "r1"), first_state)
        assert objects.ranged_reads > 0, "chunks are read as ranges of their packs"
        assert check(store, read_data=True).ok

        store.remove_snapshot(first.snapshot)
        packs_before = set(objects.list("packs"))
        done = prune_mod.prune(store)
        assert done.deleted_packs + done.repacked_packs > 0, done
        assert set(objects.list("packs")) != packs_before
        result = check(store, read_data=True)
        assert result.ok and result.chunks_verified > 0, result

    # Only working state is local (the index, lock files): every object of the store,
    # and no copy of one, is in the backend.
    assert {f for f in local_files(state)
            if not f.startswith(("index.sqlite", "locks/"))} == set()
    assert held_kinds(objects) == {"config", "snapshots", "packs"} | (
        {"keys"} if passphrase else set())

    # The index is derived data: another process, with a working state of its own,
    # indexes the packs it finds and restores the snapshot whole.
    with Store.open_on(objects, tmp_path / "state2", passphrase) as other:
        assert check(other, read_data=True).ok
        snap = other.resolve_snapshot(second.snapshot[:10])
        assert restore(other, snap, tmp_path / "r2").errors == []
    trees.assert_same_state(trees.tree_state(tmp_path / "r2"), second_state)


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_check_finds_a_damaged_object_in_an_object_store(tmp_path, trees, object_store,
                                                         damage):
    objects = object_store
    src = trees.make_tree(tmp_path / "src", seed=22, files=30, dirs=2)
    with Store.init_on(objects, tmp_path / "state", pack_size=256 << 10) as store:
        backup(store, src)
        # a full pack: only file chunks (the manifest goes to the last, partly filled one)
        name = max(objects.list("packs"), key=lambda n: objects.stat("packs", n).size)
        data = objects.load("packs", name)
        # Written over in place, which no writer does: a disk or a copy tool gone wrong.
        objects.save("packs", name, data[:100] + bytes([data[100] ^ 1]) + data[101:]
                     if damage == "flipped" else data[:len(data) // 2])
        result = check(store, read_data=True)
        assert not result.ok
        assert [d["pack"] for d in result.damaged_packs] == [name]
        assert result.hurt, "the files that need the damaged chunks are named"
        if damage == "truncated":  # a restore reading its chunks fails cleanly too
            snap = store.resolve_snapshot("latest")
            done = restore(store, snap, tmp_path / "partial")
            assert done.errors, "the files whose chunks are cut off are reported"
        objects.remove("packs", name)
        result = check(store)
        assert [d["reason"] for d in result.damaged_packs] == ["missing"]


def test_init_on_refuses_a_backend_that_holds_a_store(tmp_path):
    from strata.errors import StoreExists, StoreNotFound

    objects = MemoryBackend()
    with pytest.raises(StoreNotFound):
        Store.open_on(objects, tmp_path / "state")
    Store.init_on(objects, tmp_path / "state").close()
    with pytest.raises(StoreExists):
        Store.init_on(objects, tmp_path / "state2")

    interrupted = MemoryBackend()  # killed after saving its key file, before its config
    interrupted.save("keys", "0123456789abcdef", b"{}")
    with pytest.raises(StoreExists, match="no config"):
        Store.init_on(interrupted, tmp_path / "state3", passphrase="pw")
    assert list(interrupted.list("keys")) == ["0123456789abcdef"]

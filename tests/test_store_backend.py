"""The store on its `Backend` contract: the contract kept by the local directory and by an
in-memory object store, and a whole store life (backup, restore, check --read-data,
prune) on the in-memory one, whose objects never touch the disk."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from strata.engine import prune as prune_mod
from strata.engine.backup import backup
from strata.engine.check import check
from strata.engine.restore import restore
from strata.store.backend import KINDS, Backend, LocalBackend, ObjectInfo, ObjectNotFound
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

    def close(self) -> None:
        pass


# -- the contract, kept by both ------------------------------------------------------------


@pytest.fixture(params=["local", "memory"])
def backend(request, tmp_path) -> Iterator[Backend]:
    b: Backend = LocalBackend(tmp_path / "objects") if request.param == "local" else MemoryBackend()
    yield b
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


# -- a whole store on an object store ----------------------------------------------------


def local_files(state_dir: Path) -> set[str]:
    return {str(p.relative_to(state_dir)) for p in state_dir.rglob("*") if p.is_file()}


@pytest.mark.parametrize("passphrase", [None, "pw"], ids=["plain", "encrypted"])
def test_a_store_on_an_object_store_backs_up_restores_checks_and_prunes(
        tmp_path, trees, passphrase):
    objects = MemoryBackend()
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
    assert {k for k, _ in objects.objects} == {"config", "snapshots", "packs"} | (
        {"keys"} if passphrase else set())

    # The index is derived data: another process, with a working state of its own,
    # indexes the packs it finds and restores the snapshot whole.
    with Store.open_on(objects, tmp_path / "state2", passphrase) as other:
        assert check(other, read_data=True).ok
        snap = other.resolve_snapshot(second.snapshot[:10])
        assert restore(other, snap, tmp_path / "r2").errors == []
    trees.assert_same_state(trees.tree_state(tmp_path / "r2"), second_state)


def test_check_finds_a_damaged_object_in_an_object_store(tmp_path, trees):
    objects = MemoryBackend()
    src = trees.make_tree(tmp_path / "src", seed=22, files=30, dirs=2)
    with Store.init_on(objects, tmp_path / "state", pack_size=256 << 10) as store:
        backup(store, src)
        # a full pack: only file chunks (the manifest goes to the last, partly filled one)
        name = max(objects.list("packs"), key=lambda n: objects.stat("packs", n).size)
        data, mtime = objects.objects[("packs", name)]
        objects.objects[("packs", name)] = (data[:100] + bytes([data[100] ^ 1]) + data[101:],
                                            mtime)
        result = check(store, read_data=True)
        assert not result.ok
        assert [d["pack"] for d in result.damaged_packs] == [name]
        assert result.hurt, "the files that need the damaged chunks are named"
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

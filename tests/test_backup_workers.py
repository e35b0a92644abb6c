"""Backup's worker processes: used for many small files, and never a single point of failure."""

from __future__ import annotations

import functools
import os
import random

from strata.engine import backup as backup_mod
from strata.engine.backup import backup
from strata.engine.restore import restore
from strata.store.repository import Store


def _tree(root, files=300, seed=5):
    rng = random.Random(seed)
    for i in range(files):
        d = root / f"d{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        size = rng.choice([0, 100, 5_000, 40_000, 300_000])
        (d / f"f{i}").write_bytes(rng.randbytes(size // 2) + b"a" * (size - size // 2))
    return root


def _same(a, b):
    for dirpath, _dirs, names in os.walk(a):
        for n in names:
            pa = os.path.join(dirpath, n)
            pb = os.path.join(b, os.path.relpath(pa, a))
            with open(pa, "rb") as fa, open(pb, "rb") as fb:
                assert fa.read() == fb.read(), pa


def _backup_and_restore_exactly(tmp_path, src):
    store = Store.init(tmp_path / "store")
    result = backup(store, src)
    assert result.files == 300 and result.errors == []
    restore(store, store.load_snapshot(result.snapshot), tmp_path / "out")
    _same(src, tmp_path / "out")
    store.close()


def test_small_files_go_through_worker_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(backup_mod, "_PROCESS_POOL_AFTER", 0)
    _backup_and_restore_exactly(tmp_path, _tree(tmp_path / "src"))


def test_backup_completes_when_worker_processes_die(tmp_path, monkeypatch):
    """Workers that die at start (here: a broken initializer; in life, the OOM killer)
    make the pool unusable; the backup finishes on threads instead of failing."""
    monkeypatch.setattr(backup_mod, "_PROCESS_POOL_AFTER", 0)
    monkeypatch.setattr(backup_mod, "init_worker", functools.partial(os._exit, 3))
    _backup_and_restore_exactly(tmp_path, _tree(tmp_path / "src", seed=6))

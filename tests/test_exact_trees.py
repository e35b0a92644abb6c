"""Exact trees: what a restore or a layer update lays down matches the source in every
detail, and leaves nothing of its own behind.

- A symlink whose target did not change but whose mtime did takes the new mtime.
- A sparse file keeps its holes at 4 KiB granularity, inside chunks too.
- No empty /.strata-apply/ stays in the endpoint's root after an apply or a recovery.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_fixtures import Agent, centralized, running_server, strata_json
from strata.agent import update
from strata.engine.backup import backup
from strata.engine.restore import restore
from strata.layers.apply import ApplyJournal, Phase, crashpoints
from strata.layers.changes import Action, Change
from strata.layers.image import LayerContent, build_image
from strata.layers.plan import plan_update
from strata.layers.rules import LayerRules
from strata.model.entry import Entry, EntryType
from strata.store.repository import Store
from strata.tree.content import HOLE_BLOCK
from strata.tree.scan import scan_tree
from strata.tree.writer import TreeWriter
from tier import examples

pytestmark = pytest.mark.e2e

WORK = update.WORK_DIR
RULES = LayerRules.default("linux")
T1, T2 = 1_600_000_000_000_000_000, 1_700_000_000_123_456_789
MIB = 1 << 20


def scan(root: Path) -> list[Entry]:
    return [e for e, _ in scan_tree(root)]


def allocated(path: Path) -> int:
    return os.lstat(path).st_blocks * 512


def make_sparse(path: Path, size: int, data: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, piece in data.items():
            f.seek(offset)
            f.write(piece)


# -- symlink mtimes ----------------------------------------------------------------------------


def test_symlink_whose_mtime_changed_is_planned_and_applied(tmp_path):
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"tool")
    os.symlink("tool", root / "usr/bin/link")
    os.utime(root / "usr/bin/link", ns=(T1, T1), follow_symlinks=False)
    current = scan(root)
    target = {e.path: dataclasses.replace(e) for e in current}
    target[b"usr/bin/link"].mtime_ns = T2  # the new base's link: same target, newer
    image = build_image([LayerContent("base os:2", "base", list(target.values()), [])], RULES)

    plan = plan_update(current, image, RULES, owned=target)
    assert [(c.action, c.path) for c in plan.changes] == [(Action.META, b"usr/bin/link")]
    # A directory's mtime alone is still no change: it moves with its contents.
    target[b"usr"].mtime_ns += 5
    assert [c.path for c in plan_update(current, image, RULES, owned=target).changes] == \
        [b"usr/bin/link"]

    ino = os.lstat(root / "usr/bin/link").st_ino
    stats = ApplyJournal(root, root / WORK).apply(plan.changes, lambda e: [])
    assert stats.meta == 1 and stats.warnings == []
    st_link = os.lstat(root / "usr/bin/link")
    assert st_link.st_mtime_ns == T2 and st_link.st_ino == ino  # set in place (lutimes)
    assert os.readlink(root / "usr/bin/link") == "tool"
    assert os.stat(root / "usr/bin/tool").st_mtime_ns != T2  # never through the link


def test_restore_sets_symlink_mtimes(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    os.symlink("../nowhere", src / "d/dangling")
    os.symlink("d", src / "to-dir")
    for name, t in (("d/dangling", T1), ("to-dir", T2)):
        os.utime(src / name, ns=(t, t), follow_symlinks=False)
    with Store.init(tmp_path / "store") as store:
        sid = backup(store, src).snapshot
        result = restore(store, store.load_snapshot(sid), tmp_path / "out")
    assert result.errors == [] and result.warnings == []
    assert os.lstat(tmp_path / "out/d/dangling").st_mtime_ns == T1
    assert os.lstat(tmp_path / "out/to-dir").st_mtime_ns == T2


# -- holes -------------------------------------------------------------------------------------


def test_sparse_file_restores_with_4k_holes_inside_chunks(tmp_path):
    """The issue's case: 200 MB with 4 bytes of data in the middle of a chunk."""
    src = tmp_path / "src"
    src.mkdir()
    size = 200 * 1000 * 1000
    make_sparse(src / "disk.img", size, {size // 2 + 1000: b"DATA"})
    with Store.init(tmp_path / "store") as store:
        sid = backup(store, src).snapshot
        snap = store.load_snapshot(sid)
        entry = next(e for e in store.iter_manifest(snap) if e.path == b"disk.img")
        assert entry.sparse and max(n for _, n in entry.chunks) >= 64 * 1024
        result = restore(store, snap, tmp_path / "out")
    assert result.errors == []
    out = tmp_path / "out/disk.img"
    assert out.stat().st_size == size
    assert allocated(out) <= HOLE_BLOCK, allocated(out)  # was 256 KiB: the whole chunk
    with open(out, "rb") as f:
        f.seek(size // 2 + 1000 - 5)
        assert f.read(14) == b"\0" * 5 + b"DATA" + b"\0" * 5


def test_apply_stages_sparse_files_with_4k_holes(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    chunk = bytearray(256 * 1024)
    chunk[100_000:100_004] = b"DATA"
    chunks = [bytes(256 * 1024), bytes(chunk), bytes(256 * 1024)]
    size = sum(map(len, chunks))
    e = Entry(b"disk.img", EntryType.FILE, size=size, sparse=True, mtime_ns=T1)
    ApplyJournal(root, root / WORK).apply([Change(Action.ADD, b"disk.img", e)],
                                          lambda _e: chunks)
    assert (root / "disk.img").read_bytes() == b"".join(chunks)
    assert allocated(root / "disk.img") <= HOLE_BLOCK, allocated(root / "disk.img")


# Pieces of a file: zeros or data, of lengths that straddle 4 KiB blocks, cut into chunks
# at arbitrary points (as content-defined chunking does).
pieces = st.lists(st.tuples(st.booleans(), st.integers(1, 3 * HOLE_BLOCK)), min_size=1,
                  max_size=12)


@settings(max_examples=examples(60), deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=pieces, cuts=st.lists(st.integers(1, 40_000), max_size=8))
def test_holes_exactly_where_whole_blocks_are_zero(tmp_path, layout, cuts):
    rng = random.Random(len(layout))
    content = b"".join(rng.randbytes(n).replace(b"\0", b"\1") if data else bytes(n)
                       for data, n in layout)
    bounds = sorted({c for c in cuts if c < len(content)} | {0, len(content)})
    chunks = [content[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    data_blocks = sum(1 for i in range(0, len(content), HOLE_BLOCK)
                      if content[i:i + HOLE_BLOCK].count(0) != len(content[i:i + HOLE_BLOCK]))
    out = tmp_path / f"t{rng.random()}"
    with TreeWriter(out) as w:
        w.write(Entry(b"f", EntryType.FILE, size=len(content), sparse=True), chunks)
    assert (out / "f").read_bytes() == content
    # The filesystem may add one block of its own (an extent tree block) for many extents.
    assert allocated(out / "f") <= HOLE_BLOCK * (data_blocks + (data_blocks > 3)), \
        (allocated(out / "f"), data_blocks)
    shutil.rmtree(out)


# -- nothing left behind -----------------------------------------------------------------------


def test_work_dir_is_removed_once_nothing_is_pending(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    journal = ApplyJournal(root, root / WORK)
    journal.apply([Change(Action.ADD, b"a", Entry(b"a", EntryType.FILE, size=1))],
                  lambda e: [b"a"])
    assert journal.remove_work_dir()
    assert sorted(os.listdir(root)) == ["a"]
    # A pending apply keeps it (its phase and journal are the way back) ...
    journal = ApplyJournal(root, root / WORK)
    journal.stage([Change(Action.ADD, b"b", Entry(b"b", EntryType.FILE, size=1))],
                  lambda e: [b"b"])
    assert not journal.remove_work_dir()
    assert journal.pending() is Phase.STAGED
    # ... and so does a running one (it holds the lock).
    assert journal.switch().added == 1
    assert sorted(os.listdir(root)) == [WORK, "a", "b"]
    assert journal.remove_work_dir() and sorted(os.listdir(root)) == ["a", "b"]


class Killed(BaseException):
    """Stops an apply in-process where a kill would (apply() rolls back on Exception only)."""


def test_agent_recovery_leaves_no_work_dir(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    changes = [Change(Action.ADD, b"a", Entry(b"a", EntryType.FILE, size=1))]
    # Killed after staging: the next start discards the staging, then tidies up.
    ApplyJournal(root, root / WORK).stage(changes, lambda e: [b"a"])
    assert update.recover(root) == "discarded"
    assert os.listdir(root) == []
    # Killed during the switch: the next start rolls it forward, then tidies up.
    def kill(label: str) -> None:
        if label.startswith("rename"):
            raise Killed(label)

    monkeypatch.setattr(crashpoints, "crash_hook", kill)
    with pytest.raises(Killed):
        ApplyJournal(root, root / WORK).apply(changes, lambda e: [b"a"])
    monkeypatch.setattr(crashpoints, "crash_hook", None)
    assert ApplyJournal(root, root / WORK).pending() is Phase.SWITCHING
    assert update.recover(root) == "completed"
    assert os.listdir(root) == ["a"]
    assert update.recover(root) is None  # nothing pending, nothing created
    assert os.listdir(root) == ["a"]


# -- end to end: a base update on an endpoint --------------------------------------------------


@pytest.fixture()
def server(tmp_path: Path):
    yield from running_server(tmp_path / "server")


def test_base_update_lays_down_link_times_and_holes_and_leaves_nothing(server, tmp_path):
    v1 = tmp_path / "v1"
    (v1 / "usr/bin").mkdir(parents=True)
    (v1 / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho v1\n")
    os.symlink("tool", v1 / "usr/bin/tool-link")
    (v1 / "etc").mkdir()
    os.symlink("/usr/share/zoneinfo/UTC", v1 / "etc/localtime")
    for p in ("usr/bin/tool-link", "etc/localtime"):
        os.utime(v1 / p, ns=(T1, T1), follow_symlinks=False)
    v2 = tmp_path / "v2"
    shutil.copytree(v1, v2, symlinks=True)
    for p in ("usr/bin/tool-link", "etc/localtime"):  # same targets, newer links
        os.utime(v2 / p, ns=(T2, T2), follow_symlinks=False)
    (v2 / "var/lib").mkdir(parents=True)
    size = 64 * MIB
    make_sparse(v2 / "var/lib/disk.img", size, {size // 3 + 777: b"DATA"})

    root = tmp_path / "endpoint"
    shutil.copytree(v1, root, symlinks=True)
    (root / "home/ann").mkdir(parents=True)
    (root / "home/ann/doc.txt").write_text("mine\n")
    agent = Agent(server, root, tmp_path / "state")
    agent.enroll(server.create_token())
    centralized(agent.run_once())
    for version, tree in (("1", v1), ("2", v2)):
        server.admin_cli("layer", "capture", "--kind", "base", "--name", "os", "--version",
                         version, "--from-dir", tree)
    server.admin_cli("assign", "--all", "--base", "os:1")
    agent.run_once()
    server.admin_cli("assign", "--all", "--base", "os:2")
    assert agent.run_once()["update"]["state"] == "ready"
    res = strata_json(*agent.cmd("apply"))
    assert res["state"] == "applied", res

    for p in ("usr/bin/tool-link", "etc/localtime"):
        assert os.lstat(root / p).st_mtime_ns == T2, p
    disk = root / "var/lib/disk.img"
    assert disk.stat().st_size == size and allocated(disk) <= HOLE_BLOCK, allocated(disk)
    assert not os.path.lexists(root / WORK)
    assert (root / "home/ann/doc.txt").read_text() == "mine\n"
    assert stat.S_ISLNK(os.lstat(root / "etc/localtime").st_mode)

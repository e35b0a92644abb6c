"""Crash safety: backups and prunes killed with SIGKILL at random points, and prune racing
backups, never lose a committed snapshot nor leave a store that `check` rejects.

Kill points are drawn from a seeded RNG. They are timed from the moment the killed command
registers its writer session (a new file under locks/), i.e. once the CLI has imported and
opened the store, and spread over how long that work takes on this machine: measuring
from process start would spend most kills on the interpreter's start-up.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from strata.engine import prune as prune_mod
from strata.engine.backup import backup
from strata.engine.check import check
from strata.engine.restore import restore
from strata.store.index import ChunkIndex
from strata.store.repository import Store

pytestmark = pytest.mark.e2e

SIZES = (0, 1_000, 8_000, 30_000, 60_000, 120_000)


def new_session_appeared(locks: Path, before: set[str]) -> bool:
    try:
        return any(n.startswith("session-") for n in set(os.listdir(locks)) - before)
    except FileNotFoundError:
        return False


def run_cli(cli, store: Path, args: tuple, *, kill_after: float | None) -> tuple[str, float]:
    """Run `strata store ARGS`; with kill_after, SIGKILL it that long after its session
    appears. Returns (outcome, seconds from session start to exit or kill)."""
    locks = store / "locks"
    before = set(os.listdir(locks)) if locks.is_dir() else set()
    proc = cli.start(*args)
    try:
        while proc.poll() is None and not new_session_appeared(locks, before):
            time.sleep(0.001)
        started = time.monotonic()
        try:
            proc.wait(timeout=120 if kill_after is None else kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=120)
        took = time.monotonic() - started
        _, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode == -signal.SIGKILL:
        return "killed", took
    assert proc.returncode == 0, (args, proc.returncode, err)
    return "finished", took


def forget_all_but(store_dir: Path, keep: int) -> list[str]:
    """Library forget --keep-last KEEP; returns the kept ids."""
    with Store.open(store_dir) as store:
        snaps = store.snapshots()
        for s in snaps[:-keep]:
            store.remove_snapshot(s.id)
        return [s.id for s in snaps[-keep:]]


def assert_restores(store_dir: Path, states: dict[str, dict], sids, out: Path, trees) -> None:
    with Store.open(store_dir) as store:
        for sid in sids:
            target = out / sid[:12]
            result = restore(store, store.load_snapshot(sid), target)
            assert result.errors == [], (sid, result.errors)
            trees.assert_same_state(trees.tree_state(target), states[sid])
            shutil.rmtree(target)


def test_killed_backup_loses_no_committed_snapshot(cli, tmp_path, trees, stores):
    rng = random.Random(0x5EED)
    src = trees.make_tree(tmp_path / "src", seed=1, files=170, dirs=10, sizes=SIZES)
    store = tmp_path / "store"
    cli.ok("init", store, "--pack-size", "256KiB")

    # Kill points spread over how long the last backup that finished took (adaptive: the
    # first backup reads everything, later ones only what changed).
    window = 0.5
    known: set[str] = set()
    state_of: dict[str, dict] = {}
    outcomes = []
    for rnd in range(15):
        state = trees.tree_state(src)
        finish = rnd == 0 or rng.random() < 0.2
        outcome, took = run_cli(cli, store, ("backup", store, src, "--json"),
                                kill_after=None if finish else rng.uniform(0, window))
        if outcome == "finished":
            window = min(0.8, max(0.02, 0.9 * took))
        outcomes.append(outcome)
        with Store.open(store) as s:  # what `snapshots --json` lists, without a CLI start-up
            now = set(s.snapshot_ids())
        assert known <= now, f"committed snapshot(s) lost: {known - now}"
        new = now - known
        assert len(new) <= 1 and (new or outcome == "killed"), (outcome, new)
        for sid in new:
            state_of[sid] = state
        known |= now
        trees.mutate_tree(src, rng, rewrite=20, add=3, remove=2)
    assert outcomes.count("killed") >= 5, outcomes

    doc = cli.json("check", store, "--read-data")
    assert doc["ok"] is True, doc
    assert set(cli.snapshot_ids(store)) == known

    final_state = trees.tree_state(src)
    final = cli.json("backup", store, src)
    state_of[final["snapshot"]] = final_state
    doc = cli.json("check", store)
    assert doc["ok"] is True and doc["warnings"] == [], doc  # leftovers got indexed
    cli.ok("restore", store, "latest", tmp_path / "latest")
    trees.assert_same_state(trees.tree_state(tmp_path / "latest"), final_state)
    # every snapshot committed along the way is still exactly the tree it was taken from
    assert_restores(store, state_of, sorted(state_of), tmp_path / "restores", trees)


def test_killed_prune_leaves_a_whole_store(cli, tmp_path, trees, stores):
    rng = random.Random(0xC0FFEE)
    src = trees.make_tree(tmp_path / "src", seed=2, files=120, dirs=8, sizes=SIZES)
    store = tmp_path / "store"
    cli.ok("init", store, "--pack-size", "256KiB")
    states: dict[str, dict] = {}

    def churn_and_backup() -> None:
        trees.mutate_tree(src, rng, rewrite=25, add=3, remove=3)
        state = trees.tree_state(src)
        states[stores.lib_backup(store, src).snapshot] = state

    for _ in range(4):
        churn_and_backup()
    doc = cli.json("forget", store, "--keep-last", "2")
    kept = sorted(k["id"] for k in doc["keep"])
    assert len(kept) == 2 and len(doc["remove"]) == 2

    window = 0.3
    outcomes: list[str] = []
    # At least 8 rounds, and more (up to 16) until 3 of them were killed: on a busy
    # machine a prune may finish before the kill more often than the window expects.
    for rnd in range(16):
        if rnd >= 8 and outcomes.count("killed") >= 3:
            break
        stores.age_packs(store)  # the backups ran "an hour ago": prune may touch every pack
        finish = rnd == 0 or rng.random() < 0.2
        outcome, took = run_cli(cli, store, ("prune", store, "--json"),
                                kill_after=None if finish else rng.uniform(0, window))
        if outcome == "finished":
            window = min(0.8, max(0.02, 0.9 * took))
        outcomes.append(outcome)

        with Store.open(store) as s:  # `check --read-data` in-process; the CLI runs it below
            result = check(s, read_data=True)
            assert result.ok, (rnd, outcome, result)
            assert sorted(s.snapshot_ids()) == kept
        assert_restores(store, states, kept, tmp_path / "restores", trees)

        # more churn, so the next prune has packs to delete and repack again
        churn_and_backup()
        kept = sorted(forget_all_but(store, 2))
    assert outcomes.count("killed") >= 3, outcomes

    # a prune that is allowed to finish still leaves nothing behind
    stores.age_packs(store)
    cli.json("prune", store)
    doc = cli.json("check", store, "--read-data")
    assert doc["ok"] is True and doc["warnings"] == [], doc
    assert sorted(cli.snapshot_ids(store)) == kept
    assert_restores(store, states, kept, tmp_path / "restores", trees)


# -- prune racing a backup ------------------------------------------------------------------


def forgotten_setup(tmp_path: Path, trees, stores, seed: int):
    """S1 of tree v1 (forgotten), S2 of tree v2 (kept), packs aged; src is set to v3, which
    is v1 with a few changes, so a backup of it deduplicates against forgotten chunks."""
    rng = random.Random(seed)
    src = tmp_path / "src"
    store = tmp_path / "store"
    Store.init(store, pack_size=256 << 10).close()
    trees.make_tree(src, seed=seed, files=90, dirs=6, sizes=SIZES)
    shutil.copytree(src, tmp_path / "v1", symlinks=True)
    s1 = stores.lib_backup(store, src).snapshot
    shutil.rmtree(src)
    trees.make_tree(src, seed=seed + 1, files=60, dirs=4, sizes=SIZES)
    v2_state = trees.tree_state(src)
    s2 = stores.lib_backup(store, src).snapshot
    with Store.open(store) as s:
        s.remove_snapshot(s1)
    stores.age_packs(store)
    shutil.rmtree(src)
    shutil.copytree(tmp_path / "v1", src, symlinks=True)
    trees.mutate_tree(src, rng, rewrite=5, add=2, remove=2)
    return store, src, {s2: v2_state}


def verify_after_race(store: Path, src: Path, sid: str, states: dict, tmp_path: Path,
                      trees) -> None:
    states = {**states, sid: trees.tree_state(src)}
    with Store.open(store) as s:
        result = check(s, read_data=True)
        assert result.ok, result
        assert sorted(s.snapshot_ids()) == sorted(states)
    assert_restores(store, states, sorted(states), tmp_path / "restores", trees)


@pytest.mark.parametrize("rep", range(3))
def test_prune_concurrent_with_backup_is_safe(cli, tmp_path, trees, stores, rep):
    rng = random.Random(1000 + rep)
    store, src, states = forgotten_setup(tmp_path, trees, stores, seed=10 * rep)
    state = trees.tree_state(src)
    # prune starts anywhere from a little before the backup to well into it
    offset = rng.uniform(-0.4, 0.6)
    first, second = (("backup", store, src, "--json"), ("prune", store, "--json"))
    if offset < 0:
        first, second, offset = second, first, -offset
    p1 = cli.start(*first)
    time.sleep(offset)
    p2 = cli.start(*second)
    outs = {}
    for args, proc in ((first, p1), (second, p2)):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (args[0], err)
        outs[args[0]] = out
    sid = json.loads(outs["backup"])["snapshot"]
    assert trees.tree_state(src) == state
    verify_after_race(store, src, sid, states, tmp_path, trees)


def test_prune_between_dedup_and_commit_makes_backup_store_chunks_again(tmp_path, trees,
                                                                         stores):
    """Deterministic worst case: the backup has deduplicated against chunks of a forgotten
    snapshot, then a whole prune deletes them before the backup commits."""
    store, src, states = forgotten_setup(tmp_path, trees, stores, seed=77)
    commits = []
    pruned = []
    with Store.open(store) as bs:
        real_commit = bs.commit_snapshot

        def commit(snap, referenced):
            commits.append(snap)
            if len(commits) == 1:
                with Store.open(store) as ps:  # another writer, its own index connection
                    pruned.append(prune_mod.prune(ps))
            return real_commit(snap, referenced)

        bs.commit_snapshot = commit
        result = backup(bs, src)
    assert pruned[0].deleted_packs + pruned[0].repacked_packs > 0, pruned[0]
    assert len(commits) == 2, "the first commit should have found chunks missing"
    assert result.errors == []
    verify_after_race(store, src, result.snapshot, states, tmp_path, trees)


def test_backup_committed_while_prune_runs_keeps_its_chunks(tmp_path, trees, stores):
    """Deterministic: prune plans, a backup reusing doomed chunks commits, prune executes."""
    store, src, states = forgotten_setup(tmp_path, trees, stores, seed=78)
    with Store.open(store) as ps, ps.session("prune"):
        plan = prune_mod.plan_prune(ps)
        assert plan.delete or plan.repack, plan
        with Store.open(store) as bs:
            result = backup(bs, src)
        done = prune_mod.execute_prune(ps, plan)
    assert done.kept_for_new_snapshots > 0, done
    verify_after_race(store, src, result.snapshot, states, tmp_path, trees)


def test_backups_racing_each_other_and_prune(cli, tmp_path, trees, stores):
    """Two backups of overlapping trees and a prune, all at once, threads in one process."""
    store, src, states = forgotten_setup(tmp_path, trees, stores, seed=79)
    src2 = tmp_path / "src2"
    shutil.copytree(src, src2, symlinks=True)
    trees.mutate_tree(src2, random.Random(5), rewrite=3, add=1, remove=1)
    results, errors = {}, []

    def run(name, fn):
        try:
            with Store.open(store) as s:
                results[name] = fn(s)
        except BaseException as exc:  # reported below
            errors.append((name, exc))

    threads = [threading.Thread(target=run, args=("a", lambda s: backup(s, src))),
               threading.Thread(target=run, args=("b", lambda s: backup(s, src2))),
               threading.Thread(target=run, args=("prune", prune_mod.prune))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    states[results["b"].snapshot] = trees.tree_state(src2)
    verify_after_race(store, src, results["a"].snapshot, states, tmp_path, trees)


# -- regressions: long-lived readers, orphaned packs -----------------------------------------


def test_open_store_reads_new_chunks_after_another_process_prunes(tmp_path, trees, stores):
    """A long-lived Store (a server) caches pack ids -> names; another process prunes the
    newest pack and writes a new one, which must not inherit the deleted pack's id."""
    rng = random.Random(9)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(rng.randbytes(300_000))
    store = tmp_path / "store"
    Store.init(store, pack_size=256 << 10).close()
    stores.lib_backup(store, src)
    (src / "a").write_bytes(rng.randbytes(300_000))
    doomed = stores.lib_backup(store, src).snapshot

    with Store.open(store) as reader:  # a long-lived process, e.g. a server
        snap = reader.load_snapshot(doomed)
        list(reader.iter_manifest(snap))  # reads (and caches) the newest pack
        newest = reader.index.lookup(snap.manifest_chunk_ids()[0]).pack
        with Store.open(store) as other:
            other.remove_snapshot(doomed)
            stores.age_packs(store)
            assert prune_mod.prune(other).deleted_packs > 0
            assert newest not in other.index.packs()
            (src / "b").write_bytes(rng.randbytes(100_000))
            fresh = backup(other, src).snapshot
        snap = reader.load_snapshot(fresh)
        for entry in reader.iter_manifest(snap):
            for cid, _ in entry.chunks:
                reader.load_chunk(cid)


def test_prune_reclaims_pack_orphaned_by_killed_repack(tmp_path, trees, stores, monkeypatch):
    """A prune killed between saving a repacked pack and indexing it leaves a pack whose
    chunks are all indexed elsewhere (encrypted: a repeat repack gets another name); the
    next prunes must delete it rather than keep it forever."""
    pw = "pw"
    src = trees.make_tree(tmp_path / "src", seed=3, files=30, dirs=2, sizes=(30_000, 60_000))
    store = tmp_path / "store"
    Store.init(store, pack_size=256 << 10, passphrase=pw).close()
    stores.lib_backup(store, src, pw)
    trees.mutate_tree(src, random.Random(3), rewrite=15, add=0, remove=0)
    keep = stores.lib_backup(store, src, pw).snapshot
    with Store.open(store, pw) as s:
        s.remove_snapshot(next(i for i in s.snapshot_ids() if i != keep))
    stores.age_packs(store)

    def killed(*args, **kwargs):  # the process dies right after writing a repacked pack
        raise KeyboardInterrupt

    with Store.open(store, pw) as s:
        assert prune_mod.plan_prune(s).repack
        monkeypatch.setattr(ChunkIndex, "move_chunks", killed)
        with pytest.raises(KeyboardInterrupt):
            prune_mod.prune(s)
        monkeypatch.undo()
    for _ in range(2):
        stores.age_packs(store)
        with Store.open(store, pw) as s:
            prune_mod.prune(s)
    with Store.open(store, pw) as s:
        assert check(s, read_data=True).ok
        empty = [name for name in s.index.packs() if not s.index.pack_chunks(name)]
        assert empty == [], f"{len(empty)} pack(s) hold no indexed chunk yet are kept"


@pytest.mark.parametrize("how", ["index-lost-newest-rows", "repair-index-killed-midway"])
def test_check_accepts_packs_the_index_lost(cli, tmp_path, trees, stores, monkeypatch, how):
    src = trees.make_tree(tmp_path / "src", seed=4, files=60, dirs=3, sizes=SIZES)
    store = tmp_path / "store"
    Store.init(store, pack_size=256 << 10).close()
    stores.lib_backup(store, src)
    trees.mutate_tree(src, random.Random(4), rewrite=10)
    want = trees.tree_state(src)
    sid = stores.lib_backup(store, src).snapshot
    with Store.open(store) as s:
        if how == "index-lost-newest-rows":
            newest = sorted(s.index.db.execute("SELECT pid, name FROM packs"))[-3:]
            s.index.drop_packs(name for _, name in newest)
        else:
            real_add, calls = ChunkIndex.add_pack, []

            def add_then_die(self, *args, **kwargs):
                calls.append(1)
                if len(calls) > 3:
                    raise KeyboardInterrupt  # killed after indexing three packs
                return real_add(self, *args, **kwargs)

            monkeypatch.setattr(ChunkIndex, "add_pack", add_then_die)
            with pytest.raises(KeyboardInterrupt):
                s.rebuild_index()
            monkeypatch.undo()
        if how == "index-lost-newest-rows":
            assert s.unindexed_packs()
        else:  # the rebuild is one transaction: a kill leaves the old index whole
            assert s.unindexed_packs() == []

    for extra in ((), ("--read-data",)):
        proc = cli.run("check", store, "--json", *extra)
        assert "Traceback" not in proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["hurt"] == [] and doc["missing_chunks"] == 0, doc
        assert proc.returncode == 0 and doc["ok"] is True, doc
    # the data really is all there: the next backup reconciles and restores it whole
    stores.lib_backup(store, src)
    assert stores.lib_restore(store, sid, tmp_path / "out").errors == []
    trees.assert_same_state(trees.tree_state(tmp_path / "out"), want)


@pytest.mark.parametrize("read_data", [False, True], ids=["structure", "read-data"])
def test_check_concurrent_with_prune_reports_no_damage(tmp_path, trees, stores, read_data):
    store, src, states = forgotten_setup(tmp_path, trees, stores, seed=80)
    pruned = []

    def prune_now(_size: int) -> None:  # prune runs to completion after check's first pack
        if not pruned:
            with Store.open(store) as ps:
                pruned.append(prune_mod.prune(ps))

    with Store.open(store) as s:
        result = check(s, read_data=read_data, on_pack=prune_now)
    assert pruned[0].deleted_packs + pruned[0].repacked_packs > 0, pruned[0]
    assert result.damaged_packs == [] and result.hurt == [], result
    assert result.ok


def test_check_concurrent_with_forget_does_not_crash(tmp_path, trees, stores):
    store, src, states = forgotten_setup(tmp_path, trees, stores, seed=81)
    stores.lib_backup(store, src)
    with Store.open(store) as s:
        ids = s.snapshot_ids()
        real_load = s.load_snapshot

        def load_while_forgetting(sid):  # another process forgets the next snapshot now
            with Store.open(store) as other:
                for victim in ids[ids.index(sid) + 1:]:  # one not yet checked
                    if (store / "snapshots" / victim).exists():
                        other.remove_snapshot(victim)
                        break
            return real_load(sid)

        s.load_snapshot = load_while_forgetting
        result = check(s, read_data=True)
    assert len(list((store / "snapshots").iterdir())) == 1
    assert result.ok, result

"""An in-place restore never loses a newer local edit silently: the agent asks first
(`--yes` for scripts; without a terminal it refuses in one line), and every local path
that differs from the snapshot is kept beside it as NAME.strata-TIME. A restore `--to`
a directory is unaffected; a restore that fails puts the local version back.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

import pytest

from server_fixtures import (
    Agent,
    argv,
    assert_one_line_error,
    centralized,
    cli_env,
    running_server,
    strata,
)
from strata.engine.backup import backup
from strata.engine.restore import restore
from strata.engine.restore_inplace import displaced_by, keep_aside, kept_suffix, put_back_failed
from strata.errors import CorruptData, StrataError
from strata.model.snapshot import Snapshot
from strata.store.repository import Store

SUFFIX = kept_suffix(1_800_000_000)  # 2027-01-15T08:00:00Z


def make_tree(root: Path) -> None:
    (root / "home/alice").mkdir(parents=True)
    (root / "home/alice/report.odt").write_text("version 1\n")
    (root / "home/alice/notes.txt").write_text("unchanged\n")
    (root / "home/alice/photos").mkdir()
    (root / "home/alice/photos/cat.jpg").write_bytes(b"cat")
    os.symlink("notes.txt", root / "home/alice/link")


def test_only_paths_that_differ_are_displaced_and_kept(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    with Store.init(tmp_path / "st") as store:
        snap = store.load_snapshot(backup(store, src).snapshot)
        (src / "home/alice/report.odt").write_text("version 2, newer\n")
        # A file where the snapshot has a directory: restore would delete the directory.
        (src / "home/alice/photos/cat.jpg").unlink()
        (src / "home/alice/photos").rmdir()
        (src / "home/alice/photos").write_text("a file now\n")
        os.unlink(src / "home/alice/link")
        os.symlink("elsewhere", src / "home/alice/link")

        displaced = displaced_by(store, snap, src, ["home/alice"])
        assert sorted(d.path for d in displaced) == [
            b"home/alice/link", b"home/alice/photos", b"home/alice/report.odt"]
        kept = keep_aside(src, displaced, SUFFIX)
        result = restore(store, snap, src, includes=["home/alice"], full_metadata=True)
        assert not result.errors
        kept = put_back_failed(src, kept)

    assert (src / "home/alice/report.odt").read_text() == "version 1\n"
    assert (src / "home/alice/report.odt.strata-20270115T080000Z").read_text() == \
        "version 2, newer\n"
    assert (src / "home/alice/photos/cat.jpg").read_bytes() == b"cat"
    assert (src / "home/alice/photos.strata-20270115T080000Z").read_text() == "a file now\n"
    assert os.readlink(src / "home/alice/link.strata-20270115T080000Z") == "elsewhere"
    assert not (src / "home/alice/notes.txt.strata-20270115T080000Z").exists()
    assert all(k.restored for k in kept)


def test_a_name_already_taken_gets_a_counter(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    with Store.init(tmp_path / "st") as store:
        snap = store.load_snapshot(backup(store, src).snapshot)
        for round_ in (2, 3):
            (src / "home/alice/report.odt").write_text(f"version {round_}\n")
            kept = keep_aside(src, displaced_by(store, snap, src, ["home/alice/report.odt"]),
                              SUFFIX)
            restore(store, snap, src, includes=["home/alice/report.odt"])
    assert [k.kept_as for k in kept] == [b"home/alice/report.odt" + SUFFIX + b"-2"]
    assert (src / "home/alice/report.odt.strata-20270115T080000Z").read_text() == "version 2\n"
    assert (src / "home/alice/report.odt.strata-20270115T080000Z-2").read_text() == \
        "version 3\n"


def test_a_planted_symlink_is_not_followed_when_keeping(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "outside"
    make_tree(src)
    with Store.init(tmp_path / "st") as store:
        snap = store.load_snapshot(backup(store, src).snapshot)
        outside.mkdir()
        (outside / "report.odt").write_text("not the endpoint's\n")
        (src / "home/alice/photos/cat.jpg").unlink()
        (src / "home/alice/photos").rmdir()
        os.rename(src / "home/alice", tmp_path / "alice-moved")
        os.symlink(outside, src / "home/alice")  # home/alice now leads out of the tree
        displaced = displaced_by(store, snap, src, ["home/alice/report.odt"])
    # Only the symlink itself (it is not the directory the snapshot holds) is displaced;
    # nothing beyond it was looked at or renamed.
    assert [d.path for d in displaced] == [b"home/alice"]
    assert os.listdir(outside) == ["report.odt"]


class FailingSource:
    """A store whose chunks all come back damaged."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def iter_manifest(self, snap: Snapshot):
        return self.store.iter_manifest(snap)

    def load_chunks(self, ids: list[bytes]) -> list[bytes | CorruptData]:
        return [CorruptData("damaged") for _ in ids]


def test_a_failed_restore_puts_the_local_version_back(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    with Store.init(tmp_path / "st") as store:
        snap = store.load_snapshot(backup(store, src).snapshot)
        (src / "home/alice/report.odt").write_text("version 2\n")
        source = FailingSource(store)
        kept = keep_aside(src, displaced_by(source, snap, src, ["home/alice/report.odt"]),
                          SUFFIX)
        result = restore(source, snap, src, includes=["home/alice/report.odt"])
        assert len(result.errors) == 1
        kept = put_back_failed(src, kept)
    assert [k.restored for k in kept] == [False]
    assert (src / "home/alice/report.odt").read_text() == "version 2\n"
    assert sorted(p.name for p in (src / "home/alice").iterdir()) == [
        "link", "notes.txt", "photos", "report.odt"]


# -- the agent, end to end -------------------------------------------------------------------


@pytest.fixture()
def agent(tmp_path: Path):
    for server in running_server(tmp_path / "server"):
        root = tmp_path / "endpoint"
        make_tree(root)
        a = Agent(server, root, tmp_path / "state")
        a.enroll(server.create_token())
        centralized(a.run_once())
        yield a


@pytest.mark.e2e
def test_agent_restore_in_place_asks_and_keeps_the_newer_edit(agent, tmp_path):
    report = agent.root / "home/alice/report.odt"
    report.write_text("version 2, edited after the snapshot\n")

    # No terminal and no --yes: one line, nothing touched.
    proc = strata(*agent.cmd("restore", "home/alice/report.odt"), rc=None)
    assert_one_line_error(proc, "refusing without --yes")
    assert report.read_text() == "version 2, edited after the snapshot\n"
    assert sorted(p.name for p in report.parent.iterdir()) == [
        "link", "notes.txt", "photos", "report.odt"]

    proc = strata(*agent.cmd("restore", "home/alice/report.odt", "--yes"))
    assert "kept the local home/alice/report.odt as home/alice/report.odt.strata-" in \
        proc.stdout
    assert report.read_text() == "version 1\n"
    [kept] = [p for p in report.parent.iterdir() if p.name.startswith("report.odt.strata-")]
    assert kept.read_text() == "version 2, edited after the snapshot\n"

    # Unchanged since the snapshot: nothing to lose, so nothing is asked or kept.
    doc = json.loads(strata(*agent.cmd("restore", "home/alice/notes.txt", "--json")).stdout)
    assert doc["kept"] == [] and doc["files"] == 1

    # --to a directory never touches the endpoint's files, so it does not ask.
    report.write_text("version 3\n")
    doc = agent.restore("home/alice/report.odt", to=tmp_path / "elsewhere")
    assert doc["kept"] == []
    assert (tmp_path / "elsewhere/home/alice/report.odt").read_text() == "version 1\n"
    assert report.read_text() == "version 3\n"


def test_a_failed_rename_puts_back_what_was_kept_and_restores_nothing(tmp_path, monkeypatch):
    from strata.engine import restore_inplace

    src = tmp_path / "src"
    make_tree(src)
    with Store.init(tmp_path / "st") as store:
        snap = store.load_snapshot(backup(store, src).snapshot)
        (src / "home/alice/notes.txt").write_text("edited\n")
        (src / "home/alice/report.odt").write_text("edited too\n")
        displaced = displaced_by(store, snap, src, ["home/alice"])
    assert len(displaced) == 2
    real, calls = os.rename, []

    def rename(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise PermissionError(13, "Operation not permitted")
        return real(*args, **kwargs)
    monkeypatch.setattr(restore_inplace.os, "rename", rename)
    with pytest.raises(StrataError, match="cannot keep the local home/alice/report.odt aside"):
        keep_aside(src, displaced, SUFFIX)
    assert sorted(p.name for p in (src / "home/alice").iterdir()) == [
        "link", "notes.txt", "photos", "report.odt"]
    assert (src / "home/alice/notes.txt").read_text() == "edited\n"


def run_on_a_terminal(args: list[object], answer: str) -> subprocess.CompletedProcess[str]:
    """`strata ARGS` with a terminal as stdin (a pty) on which `answer` is typed."""
    master, slave = pty.openpty()
    try:
        os.write(master, answer.encode())
        return subprocess.run(argv(args), env=cli_env(), stdin=slave, capture_output=True,
                              text=True, timeout=120)
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.e2e
def test_on_a_terminal_the_person_is_asked(agent):
    report = agent.root / "home/alice/report.odt"
    report.write_text("version 2\n")
    no = run_on_a_terminal(agent.cmd("restore", "home/alice/report.odt"), "n\n")
    assert no.returncode == 2 and "cancelled: nothing was changed" in no.stderr, no.stderr
    assert "home/alice/report.odt (10 bytes, modified " in no.stderr  # what would go
    assert report.read_text() == "version 2\n"
    yes = run_on_a_terminal(agent.cmd("restore", "home/alice/report.odt"), "y\n")
    assert yes.returncode == 0, yes.stderr
    assert report.read_text() == "version 1\n"
    [kept] = [p for p in report.parent.iterdir() if p.name.startswith("report.odt.strata-")]
    assert kept.read_text() == "version 2\n"

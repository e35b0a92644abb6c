"""The CLI's failures: one clear line on stderr, no traceback, exit code 2.

Paths are given relative to the CLI's working directory; a long message (wider than the
80 columns Rich assumes without a terminal) is tested on its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from server_fixtures import assert_one_line_error
from strata.engine.backup import backup
from strata.store.repository import Store

pytestmark = pytest.mark.e2e

PASS = "s3cret passphrase"
UNKNOWN = "deadbeef"


@pytest.fixture
def store_with_snapshot(tmp_path: Path) -> tuple[str, str]:
    """A plain store "st" (relative to the CLI's cwd) holding one snapshot; (dir, id)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.txt").write_bytes(b"hello\n")
    with Store.init(tmp_path / "st") as store:
        sid = backup(store, src).snapshot
    return "st", sid


@pytest.fixture
def encrypted_store(tmp_path: Path) -> str:
    Store.init(tmp_path / "enc", passphrase=PASS).close()
    return "enc"


def test_restore_of_unknown_snapshot_id_is_one_line(cli, store_with_snapshot):
    store, _ = store_with_snapshot
    assert_one_line_error(cli.run("restore", store, UNKNOWN, "out"), UNKNOWN)


def test_ls_of_unknown_snapshot_id_is_one_line(cli, store_with_snapshot):
    store, _ = store_with_snapshot
    assert_one_line_error(cli.run("ls", store, UNKNOWN), UNKNOWN)


def test_diff_with_unknown_snapshot_id_is_one_line(cli, store_with_snapshot):
    store, sid = store_with_snapshot
    assert_one_line_error(cli.run("diff", store, sid[:8], UNKNOWN), UNKNOWN)
    assert_one_line_error(cli.run("diff", store, UNKNOWN, sid), UNKNOWN)


def test_latest_of_an_empty_store_is_one_line(cli, tmp_path):
    Store.init(tmp_path / "empty").close()
    assert_one_line_error(cli.run("restore", "empty", "latest", "out"), "no snapshots")


def test_missing_store_directory_is_one_line(cli):
    for args in (("snapshots", "nope"), ("backup", "nope", "."),
                 ("restore", "nope", "latest", "out")):
        assert_one_line_error(cli.run(*args), "no Strata store", "nope", rc=10)


def test_directory_that_is_not_a_store_is_one_line(cli, tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "some-file").write_text("not a store")
    assert_one_line_error(cli.run("snapshots", "plain"), "no Strata store", "plain", rc=10)
    assert_one_line_error(cli.run("check", "plain", "--read-data"), "no Strata store", rc=10)


def test_wrong_passphrase_is_one_line(cli, encrypted_store):
    proc = cli.run("snapshots", encrypted_store, passphrase="not the passphrase")
    assert_one_line_error(proc, "wrong passphrase", rc=12)


def test_encrypted_store_without_passphrase_is_one_line(cli, encrypted_store):
    # stdin is not a TTY, so there is no prompt to fall back on
    proc = cli.run("snapshots", encrypted_store)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert_one_line_error(cli.run("snapshots", encrypted_store), "passphrase")


def test_unreadable_passphrase_file_is_one_line(cli, encrypted_store):
    proc = cli.run("snapshots", encrypted_store, "--passphrase-file", "no-such-file")
    assert_one_line_error(proc, "no-such-file")


def test_init_on_non_empty_dir_is_one_line(cli, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "data.txt").write_text("precious")
    assert_one_line_error(cli.run("init", "busy"), "not empty")
    assert (tmp_path / "busy" / "data.txt").read_text() == "precious"
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["data.txt"]


def test_init_over_an_existing_store_is_one_line(cli, store_with_snapshot):
    store, _ = store_with_snapshot
    assert_one_line_error(cli.run("init", store), "already exists")


def test_init_encrypt_without_passphrase_or_tty_is_one_line(cli, tmp_path):
    assert_one_line_error(cli.run("init", "new", "--encrypt"), "passphrase")
    assert not (tmp_path / "new").exists(), "a store was created without a passphrase"


def test_forget_without_policy_is_one_line(cli, store_with_snapshot):
    store, sid = store_with_snapshot
    assert_one_line_error(cli.run("forget", store), "--keep")
    assert cli.snapshot_ids(store) == [sid]


def test_long_error_message_stays_on_one_line(cli, tmp_path):
    deep = tmp_path / ("a-rather-long-directory-name-" * 3) / "and-the-store-that-is-not-there"
    assert len(str(deep)) > 100
    assert_one_line_error(cli.run("snapshots", deep), "no Strata store", rc=10)


def test_each_command_alone_has_what_the_whole_tree_has():
    """`strata NAME ...` builds only NAME's part of the tree (faster start-up): it must hold
    every subcommand that the whole tree gives NAME, wherever they are defined. Each tree
    is built in a child forked from an interpreter that has imported only the entry point
    (strata.cli.main), as modules imported for one would otherwise serve the next: the
    same as a fresh interpreter each, without importing typer and the entry point again."""
    import json
    import subprocess
    import sys

    probe = """
import json, os, sys, typer
from strata.cli.main import build_app

def tree(*argv):  # in a child: what it imports stays there
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        g = typer.main.get_group(build_app(["strata", *argv]))
        os.write(write, json.dumps({n: sorted(getattr(c, "commands", {}))
                                    for n, c in g.commands.items()}).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        out = json.loads(pipe.read())
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, argv
    return out

whole = tree()
print(json.dumps([whole, {name: tree(name) for name in whole}]))
"""
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True).stdout
    whole, alone = json.loads(out)
    assert len(whole) >= 10 and "store" in whole and "provision" in whole["endpoint"]
    for name in whole:
        assert alone[name] == {name: whole[name]}, name

"""The CLI as restic's users expect it: `--version`; every error, usage errors included,
one plain line on stderr naming the value or path at fault (no traceback, no boxed panel,
no Python text such as `[Errno 2]` or an exception class name); ISO 8601 UTC timestamps;
modes as octal strings; tables that keep ids and paths whole when piped.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone

import httpx
import pytest

from server_fixtures import assert_one_line_error, strata
from strata.cli.output import iso_time, print_json
from strata.engine.backup import backup
from strata.errors import transport_cause
from strata.store.repository import Store

pytestmark = pytest.mark.e2e  # the CLI as a real process

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


@pytest.fixture
def store(tmp_path):
    """A store "st" in the CLI's working directory, with one snapshot of a source whose
    path is far wider than 80 columns."""
    src = tmp_path / ("a-source-directory-with-a-rather-long-name-" * 3) / "src"
    src.mkdir(parents=True)
    (src / "hello.txt").write_text("hello\n")
    with Store.init(tmp_path / "st") as st:
        backup(st, src)
    return src


def test_version():
    proc = strata("--version")
    assert re.fullmatch(r"strata \d+\.\d+\.\d+\S*\n", proc.stdout), proc.stdout


@pytest.mark.parametrize(("args", "words"), [
    (("nosuch",), ["No such command 'nosuch'", "strata store --help"]),
    (("backup", "st", "src", "--bogus"), ["No such option: --bogus",
                                         "strata store backup --help"]),
    (("backup", "st"), ["Missing argument 'source'"]),
    (("init", "x", "--chunk-avg", "LOTS"), ["not a size: 'LOTS'"]),
    (("forget", "st", "--keep-last", "-5"), ["--keep-last must be >= -1", "-5"]),
    (("forget", "st", "--keep-last", "LOTS"), ["--keep-last: 'LOTS' is not a whole number"]),
    (("forget", "st", "--keep-daily=1.5"), ["--keep-daily: '1.5' is not a whole number"]),
    (("init", "zero", "--pack-size", "0"), ["pack size 0 bytes is out of range"]),
    (("init", "huge", "--pack-size", "100GiB"), ["out of range: give 64KiB to 1GiB"]),
    (("ls", "st", "latest", "nope/x"), ["not in snapshot", "nope/x"]),
    (("restore", "st", "latest", "/proc/no-such-dir/out"), ["/proc/no-such-dir"]),
    (("restore", "st", "latest", "out", "--include", "/"), ["'/' names no path"]),
    (("restore", "st", "latest", "/etc/hostname"), ["/etc/hostname exists and is not a "
                                                    "directory"]),
])
def test_every_error_is_one_plain_line(cli, store, args, words):
    proc = cli.run(*args)
    assert_one_line_error(proc, *words)
    assert "[Errno" not in proc.stderr and "╭" not in proc.stderr
    assert not (cli.cwd / "zero").exists() and not (cli.cwd / "huge").exists()


def test_a_bad_rate_is_one_line(tmp_path):
    proc = strata("agent", "backup", "--limit-upload", "LOTS", "--state", tmp_path, rc=None)
    assert_one_line_error(proc, "not a rate: 'LOTS'")


def test_an_unreachable_server_is_named_by_its_cause(tmp_path):
    token = tmp_path / "token"
    token.write_text("x\n")
    proc = strata("endpoint", "list", "--server", "http://127.0.0.1:1", "--admin-token-file",
                  token, rc=None)
    assert_one_line_error(proc, "cannot reach http://127.0.0.1:1: connection refused")
    assert "ConnectError" not in proc.stderr
    proc = strata("endpoint", "list", "--server", "127.0.0.1:1", "--admin-token-file", token,
                  rc=None)
    assert_one_line_error(proc, "server URL '127.0.0.1:1' must look like https://HOST:PORT")


def test_transport_causes_are_words():
    assert transport_cause(httpx.ConnectError("[Errno 111] Connection refused")) == \
        "Connection refused"
    assert transport_cause(httpx.RemoteProtocolError("Server disconnected")) == \
        "the server closed the connection without a proper answer"
    assert transport_cause(httpx.ReadTimeout("")) == "the server did not answer in time"


def test_piped_tables_keep_paths_whole_and_times_iso(cli, store):
    out = cli.ok("snapshots", "st")  # stdout is a pipe here
    assert str(store) in out  # no "…" cutting it to 80 columns
    assert ISO.search(out), out
    listing = cli.ok("ls", "st", "latest")
    assert ISO.search(listing) and "hello.txt" in listing
    [entry] = json.loads(cli.run("ls", "st", "latest", "--json").stdout)
    assert entry["mode"] == "0644"


def test_one_timestamp_format(capsys):
    assert iso_time(datetime(2026, 12, 2, 10, 3, tzinfo=UTC)) == "2026-12-02T10:03:00Z"
    plus_one = timezone(timedelta(hours=1))
    assert iso_time(datetime(2026, 12, 2, 11, 3, tzinfo=plus_one)) == "2026-12-02T10:03:00Z"
    assert iso_time("2026-12-02T10:03:00.5+00:00") == "2026-12-02T10:03:00Z"
    assert iso_time(datetime(2026, 12, 2, 10, 3)) == "2026-12-02T10:03:00Z"  # naive: UTC
    assert iso_time(None) == ""
    print_json({"when": datetime(2026, 12, 2, 11, 3, tzinfo=plus_one),
                "made": ["2026-12-02T10:03:00.123456+00:00"], "text": "at 10:00+00:00"})
    assert json.loads(capsys.readouterr().out) == {
        "when": "2026-12-02T10:03:00Z", "made": ["2026-12-02T10:03:00.123456Z"],
        "text": "at 10:00+00:00"}

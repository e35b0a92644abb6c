"""What endpoints and the server say reaches the admin's terminal as plain text: Rich
markup in a hostname neither crashes a command nor styles anything, and no control
character (escape sequences, C1 controls, bidirectional overrides) is written."""

from __future__ import annotations

import re
from typing import Any

import pytest
from typer.testing import CliRunner

from strata.cli import admin_client, output
from strata.cli.main import build_app
from strata.cli.output import clean, safe

HOSTILE = "laptop-[/][red]x\x1b[2J\x9b31m\u202eevil\x07"
NOW = "2026-12-02T10:00:00Z"
# Whatever a terminal would act on: ESC, CSI (C1), BEL, bidi overrides, other controls.
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

STATUS = {"state": "failed", "percent": 10.0, "detail": HOSTILE, "layers": [HOSTILE],
          "applied": [HOSTILE], "operation": None, "enforce": False, "downloaded_bytes": 0,
          "task": None, "updated_at": NOW}
ENDPOINT = {"id": "e" * 36, "hostname": HOSTILE, "os": HOSTILE, "state": "pending",
            "enrolled_at": NOW, "last_seen": NOW, "last_ip": "10.0.0.1", "last_snapshot": None,
            "snapshots": 1, "tags": [HOSTILE],
            "inventory": {"os_name": HOSTILE, "hardware": {"vendor": HOSTILE,
                                                           "model": HOSTILE}},
            "layers": STATUS}
DETAIL = {**ENDPOINT,
          "snapshot_list": [{"id": "s" * 64, "time": NOW, "trigger": HOSTILE, "files": 1,
                             "bytes_total": 1, "bytes_new": 1}],
          "transactions": [{"id": 1, "endpoint": "e" * 36, "kind": HOSTILE, "started": NOW,
                            "finished": NOW, "snapshot": None, "files_changed": 0,
                            "bytes_before_dedup": 0, "bytes_after_dedup": 0,
                            "bytes_on_wire": 0, "seconds": 1.0, "result": HOSTILE,
                            "retries": 0, "error": HOSTILE}]}
COMPLIANCE = {"endpoints": [
    {"endpoint": "e" * 36, "hostname": HOSTILE, "snapshot": "s" * 64, "snapshot_time": NOW,
     "enforce": False, "score": 50.0, "managed": 2, "drift": 1, "changed": [HOSTILE],
     "missing": [], "added": [HOSTILE],
     "counts": {"changed": 1, "missing": 0, "added": 1}, "layers": {}},
    {"endpoint": "f" * 36, "hostname": HOSTILE, "state": HOSTILE}], "layers": {HOSTILE: 50.0}}
LAYERS = [{"id": 1, "kind": "base", "name": "os", "version": "1", "ref": "os:1",
           "snapshot": "s" * 64, "os": HOSTILE, "match": {"vendor": HOSTILE}, "removes": 0,
           "files": 1, "bytes": 1, "source": HOSTILE, "created_at": NOW}]


def answer(path: str) -> object:
    if path.endswith("/endpoints"):
        return [ENDPOINT]
    if "/endpoints/" in path:
        return DETAIL
    if path.endswith("/compliance"):
        return COMPLIANCE
    if path.endswith("/layers"):
        return LAYERS
    raise AssertionError(path)


@pytest.fixture
def hostile_server(monkeypatch: pytest.MonkeyPatch) -> None:
    def call(self: Any, method: str, path: str, body: object = None,
             params: object = None) -> object:
        return answer(path)
    monkeypatch.setattr(admin_client.AdminClient, "call", call)
    monkeypatch.setenv("STRATA_ADMIN_TOKEN", "sadm_test")
    monkeypatch.setattr(output.console, "_width", 1000)  # no column cut short


def run(*args: str, rc: int = 0) -> str:
    app = build_app(["strata", *args])
    result = CliRunner().invoke(app, [*args, "--server", "http://127.0.0.1:9"])
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert result.exit_code == rc, result.output
    return result.output


@pytest.mark.parametrize("command", [
    ("endpoint", "list"), ("endpoint", "list", "--pending"), ("endpoint", "show", "e" * 8),
    ("compliance",), ("compliance", "--endpoint", "e" * 8), ("layer", "list")])
def test_hostile_hostname_is_printed_as_text(hostile_server: None,
                                             command: tuple[str, ...]) -> None:
    # The hostile fixture drifts: compliance says so with exit 1, as for any drift.
    out = run(*command, rc=1 if command[0] == "compliance" else 0)
    assert not CONTROL.search(out), repr(out)
    # Shown literally (possibly cut by a table column): not taken for markup.
    assert "laptop-[" in out, out


def test_endpoint_show_keeps_markup_characters_literal(hostile_server: None) -> None:
    out = run("endpoint", "show", "e" * 8)
    assert "laptop-[/][red]x?[2J?31m?evil?" in out, out


def test_server_error_message_is_one_clean_line(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from strata.cli.output import print_error

    print_error(f"server refused (404): no endpoint {HOSTILE}\nsecond line")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not CONTROL.search(err.rstrip("\n")), repr(err)
    assert "[/][red]x" in err


def test_clean_and_safe() -> None:
    assert clean("a\x1b[2Jb\nc\td\u202e") == "a?[2Jb?c?d?"
    assert safe("[/]x") == "\\[/]x"


def test_server_log_lines_carry_no_control_characters() -> None:
    import logging

    from strata.cli.output import CleanLogFormatter

    record = logging.LogRecord("strata.server", logging.WARNING, __file__, 1,
                               "client %s went away during %s", ("10.0.0.9", "/x\x1b[2J\x9b"),
                               None)
    line = CleanLogFormatter("%(levelname)s: %(message)s").format(record)
    assert line == "WARNING: client 10.0.0.9 went away during /x?[2J?"

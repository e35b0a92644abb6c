"""`strata server --config FILE`: every flag is a key, the file is checked whole with one
line per fault, and flags override it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import typer.main

import web
from server_fixtures import HEALTH, Server, free_port, kill_group, spawn, strata, wait_for
from strata.cli.server import serve
from strata.server.config_file import KEYS, ConfigFileInvalid, load_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_every_flag_of_the_server_is_a_key():
    app = typer.Typer(add_completion=False)
    app.command()(serve)
    command = typer.main.get_command(app)
    flags = {opt.lstrip("-") for p in command.params for opt in p.opts if opt.startswith("--")}
    assert flags - {"config", "help"} == set(KEYS)


def test_a_good_file_gives_the_values_the_flags_would(tmp_path):
    path = _write(tmp_path, """
listen = "0.0.0.0:8470"
data = "/srv/strata"
tls-name = ["strata.example.net", "10.0.0.5"]
insecure = false
maintenance-interval = 600
header-timeout = 2.5
common-holders = 4
catalog = "postgresql://strata@db.example.net/strata"
store = "s3://bucket/site-a"
""")
    got = load_config(path)
    assert got["listen"] == "0.0.0.0:8470" and got["data"] == Path("/srv/strata")
    assert got["tls-name"] == ["strata.example.net", "10.0.0.5"]
    assert got["maintenance-interval"] == 600.0 and got["header-timeout"] == 2.5
    assert got["common-holders"] == 4 and got["insecure"] is False


def test_every_fault_is_named_on_its_own_line(tmp_path):
    path = _write(tmp_path, """
listen = 8470
tls_cert = "/etc/strata/cert.pem"
colour = "blue"
tls = "yes"
common-holders = 1
maintenance-interval = -5
tls-name = "one.example"
""")
    with pytest.raises(ConfigFileInvalid) as caught:
        load_config(path)
    problems = caught.value.problems
    assert len(problems) == 7
    assert all(p.startswith(f"{path}: ") and "\n" not in p for p in problems)
    text = "\n".join(problems)
    assert "'listen' must be an address \"HOST:PORT\", not 8470" in text
    assert "unknown key 'tls_cert' (did you mean 'tls-cert'?)" in text
    assert "unknown key 'colour' (the keys are the server's flags without '--')" in text
    assert "'tls' must be true or false, not 'yes'" in text
    assert "'common-holders' must be a whole number of at least 2, not 1" in text
    assert "'maintenance-interval' must be a number of seconds, not -5" in text
    assert "'tls-name' must be a list of names" in text


@pytest.mark.parametrize("content, says", [
    (b"listen = \"127.0.0.1:1\"\nlisten = \"x\"\n", "not valid TOML"),
    (b"listen = [\n", "not valid TOML"),
    (b"\xff\xfe", "not UTF-8 text"),
])
def test_a_broken_file_is_one_line(tmp_path, content, says):
    path = tmp_path / "server.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigFileInvalid) as caught:
        load_config(path)
    assert len(caught.value.problems) == 1 and says in caught.value.problems[0]
    assert "\n" not in caught.value.problems[0]


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigFileInvalid, match="no such configuration file"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.e2e
def test_server_starts_from_the_file_and_flags_override_it(tmp_path):
    port, other = free_port(), free_port()
    path = _write(tmp_path, f'data = "{tmp_path / "data"}"\nlisten = "127.0.0.1:{port}"\n'
                  "maintenance-interval = 900\n")
    srv = Server(tmp_path / "data", port=other, args=["--config", path], signing=False)
    srv.start()  # --listen (the fixture's) overrides the file's
    try:
        assert web.get(f"http://127.0.0.1:{other}{HEALTH}", timeout=5).status_code == 200
        with pytest.raises(httpx.TransportError):
            web.get(f"http://127.0.0.1:{port}{HEALTH}", timeout=2)
    finally:
        srv.stop()
    # Without --listen, the file's address is used.
    proc = spawn("server", "--config", path)
    try:
        assert wait_for(lambda: _answers(port), 60), proc.stderr
    finally:
        kill_group(proc)


def _answers(port: int) -> bool:
    try:
        return web.get(f"http://127.0.0.1:{port}{HEALTH}", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.e2e
def test_server_refuses_a_bad_file_with_a_line_per_fault(tmp_path):
    path = _write(tmp_path, 'listen = 1\nbogus = true\n')
    proc = strata("server", "--config", path, "--data", tmp_path / "data", rc=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), proc.stderr
    assert "'listen' must be" in lines[0] and "unknown key 'bogus'" in lines[1]
    assert not (tmp_path / "data").exists()  # refused before anything was made

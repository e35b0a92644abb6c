"""`strata server` at start-up: the listen address is checked and bound before anything is
announced, one server per data directory, secrets readable by the server's user only, and
clients that stall in the middle of a request are cut off."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from server_fixtures import (
    Server,
    assert_one_line_error,
    enrolled_device,
    free_port,
    strata,
    wait_for,
)
from strata.model.ids import content_id
from strata.model.transfer import BundleWriter

pytestmark = pytest.mark.e2e  # real servers and agents


def _server_once(data: Path, *args: object) -> subprocess.CompletedProcess[str]:
    """A `strata server` that is expected to refuse to start (so it exits by itself)."""
    return strata("server", "--data", data, *args, rc=None, timeout=60)


@pytest.mark.parametrize("listen", ["127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1:http",
                                    "127.0.0.1", "::1:8470"])
def test_listen_address_out_of_range_is_refused(tmp_path: Path, listen: str) -> None:
    proc = _server_once(tmp_path / "data", "--listen", listen)
    assert_one_line_error(proc, "--listen")
    assert "Strata server on" not in proc.stderr


def test_busy_address_is_refused_before_anything_is_announced(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _server_once(tmp_path / "data", "--listen", f"127.0.0.1:{port}")
    assert_one_line_error(proc, f"127.0.0.1:{port}", "already in use")
    assert "Strata server on" not in proc.stdout + proc.stderr


def test_second_server_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    first = Server(tmp_path / "data", signing=False).start()
    try:
        proc = _server_once(tmp_path / "data", "--listen", f"127.0.0.1:{free_port()}")
        assert_one_line_error(proc, "another Strata server is running on",
                              str(tmp_path / "data"), f"pid {first.proc.pid}")  # type: ignore[union-attr]
        assert first.alive()
    finally:
        first.stop()
    # Once the first has stopped, the data directory is free again.
    again = Server(tmp_path / "data", signing=False).start()
    again.stop()


def test_data_directory_and_its_secrets_are_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)  # as an older version left it
    srv = Server(data, signing=False).start()
    try:
        token = srv.create_token()
        (tmp_path / "root").mkdir()
        (tmp_path / "root/secret.txt").write_text("salary=123456\n")
        strata("agent", "enroll", "--server", srv.url, "--token", token, "--root",
               tmp_path / "root", "--state", tmp_path / "state")
        strata("agent", "backup", "--state", tmp_path / "state")
    finally:
        srv.stop()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    files = [p for p in data.rglob("*") if p.is_file()]
    assert any(p.parent.name == "packs" or "packs" in p.parts for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    for d in (p for p in data.rglob("*") if p.is_dir()):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_a_directory_of_other_files_is_refused_not_chmodded(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    (shared / "someone-elses.txt").write_text("x")
    proc = _server_once(shared, "--listen", f"127.0.0.1:{free_port()}")
    assert_one_line_error(proc, "not a Strata data directory")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert sorted(p.name for p in shared.iterdir()) == ["someone-elses.txt"]


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Server:
    srv = Server(tmp_path_factory.mktemp("impatient") / "data", signing=False,
                 args=["--header-timeout", "0.5", "--body-timeout", "0.5"]).start()
    yield srv  # type: ignore[misc]
    srv.stop()


def _closed_by_server(sock: socket.socket, within: float = 20.0) -> bool:
    """Whether the server closes the connection (reads end) before `within` seconds."""
    sock.settimeout(within)
    try:
        while True:
            piece = sock.recv(65536)
            if not piece:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_half_sent_header_is_cut_off(impatient: Server) -> None:
    with socket.create_connection(("127.0.0.1", impatient.port)) as sock:
        sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert _closed_by_server(sock)
    with socket.create_connection(("127.0.0.1", impatient.port)) as idle:
        assert _closed_by_server(idle)  # a connection that never sends a byte
    assert impatient.alive()


def test_stalled_upload_is_cut_off_and_the_server_carries_on(impatient: Server) -> None:
    _, client = enrolled_device(impatient)
    credential = client.headers["Authorization"]
    # Two whole chunks, then the client stalls halfway through the third.
    chunks = [os.urandom(200_000) for _ in range(3)]
    w = BundleWriter()
    for c in chunks:
        w.add(content_id(c), len(c), b"\x00" + c)
    body = w.getvalue()
    with socket.create_connection(("127.0.0.1", impatient.port)) as sock:
        sock.sendall(f"POST /api/v1/agent/chunks HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: {credential}\r\nContent-Type: application/octet-stream"
                     f"\r\nContent-Length: {32 << 20}\r\n\r\n".encode()
                     + body[:len(body) - 100_000])
        assert _closed_by_server(sock)
    # The same device carries on: a whole request is unaffected by the limits. What it
    # sent whole before it stalled is kept; the chunk it stalled in is not.
    def missing() -> list[str]:
        resp = client.post("/api/v1/agent/chunks/missing",
                           json={"ids": [content_id(c).hex() for c in chunks]})
        assert resp.status_code == 200, resp.text
        return resp.json()["missing"]
    # (kept as the server lets the connection go: a moment after the client sees it close)
    assert wait_for(lambda: missing() == [content_id(chunks[2]).hex()], 30), missing()
    log = impatient.log.read_text()
    assert "went away during" in log and "/api/v1/agent/chunks" in log  # one line,
    assert "Traceback" not in log  # not sixty


# -- an encrypted store ---------------------------------------------------------------------


def test_encrypted_store_holds_no_plaintext_and_needs_its_key(tmp_path: Path) -> None:
    key = tmp_path / "store.key"
    key.write_text("kV3v0x8u2c0H5e1wq9mJ1ZrP0lS7aT4bN6yD2fG8hK0=\n")
    data = tmp_path / "data"
    srv = Server(data, signing=False, args=["--encrypt", "--passphrase-file", key]).start()
    marker = b"SALARY=987654-do-not-leak"
    secret = os.urandom(50_000) + marker + os.urandom(50_000)  # stored raw if unencrypted
    root, state = tmp_path / "root", tmp_path / "state"
    (root / "home/alice").mkdir(parents=True)
    (root / "home/alice/payroll.bin").write_bytes(secret)
    try:
        token = tmp_path / "token"
        token.write_text(srv.create_token() + "\n")
        strata("agent", "enroll", "--server", srv.url, "--token-file", token, "--root", root,
               "--state", state)
        strata("agent", "backup", "--state", state)
        strata("agent", "restore", "home/alice/payroll.bin", "--to", tmp_path / "back",
               "--state", state)
        assert (tmp_path / "back/home/alice/payroll.bin").read_bytes() == secret
        assert "(encrypted)" in srv.log.read_text()
    finally:
        srv.stop()
    packs = [p for p in (data / "store").rglob("*") if p.is_file()]
    assert packs and not any(marker in p.read_bytes() for p in packs)

    no_key = _server_once(data, "--listen", f"127.0.0.1:{free_port()}")
    assert_one_line_error(no_key, "is encrypted", "--passphrase-file")
    (tmp_path / "wrong.key").write_text("not the key\n")
    wrong = _server_once(data, "--listen", f"127.0.0.1:{free_port()}", "--encrypt",
                         "--passphrase-file", tmp_path / "wrong.key")
    assert_one_line_error(wrong, "wrong passphrase", rc=12)


def test_encrypt_is_refused_for_a_plain_store_or_without_a_key(tmp_path: Path) -> None:
    srv = Server(tmp_path / "data", signing=False).start()
    srv.stop()
    (tmp_path / "key").write_text("some key\n")
    proc = _server_once(tmp_path / "data", "--listen", f"127.0.0.1:{free_port()}",
                        "--encrypt", "--passphrase-file", tmp_path / "key")
    assert_one_line_error(proc, "created without encryption")
    proc = _server_once(tmp_path / "fresh", "--listen", f"127.0.0.1:{free_port()}",
                        "--encrypt")
    assert_one_line_error(proc, "--encrypt needs the passphrase")

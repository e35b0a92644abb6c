"""TLS by default: a server beyond loopback serves HTTPS with a self-signed certificate
made at its first start (its fingerprint printed), agents pin it at enrollment, clients
refuse plain HTTP to another machine, and a certificate failure reads as one line."""

from __future__ import annotations

import json
import shutil
import ssl
from pathlib import Path

import httpx
import pytest

from server_fixtures import Server, assert_one_line_error, free_port, strata
from strata.errors import StrataError
from strata.server.listener import ListenAddress
from strata.server.tls import server_certificate
from strata.transport import (
    check_server_url,
    describe_transport_error,
    fingerprint,
    normalize_fingerprint,
)

E2E = pytest.mark.e2e  # the tests that run real servers, agents or CLIs


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    srv = Server(tmp_path_factory.mktemp("tls") / "data", signing=False, tls=True).start()
    yield srv  # type: ignore[misc]
    srv.stop()


def cert_fingerprint(srv: Server) -> str:
    pem = (srv.data / "tls" / "cert.pem").read_text()
    return fingerprint(ssl.PEM_cert_to_DER_cert(pem))


def admin(srv: Server, *args: object, rc: int = 0) -> object:
    return strata(*args, "--server", srv.url, "--admin-token-file", srv.token_file, rc=rc)


# -- the server -------------------------------------------------------------------------------


def test_beyond_loopback_the_server_makes_and_keeps_a_certificate(tmp_path: Path) -> None:
    everywhere = ListenAddress("0.0.0.0", 8470)
    first = server_certificate(everywhere, tmp_path, tls_names=["strata.example.net"])
    assert first is not None and first.self_signed and first.created
    again = server_certificate(everywhere, tmp_path)
    assert again is not None and not again.created
    assert again.fingerprint == first.fingerprint  # agents' pins stay valid across restarts
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(first.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "strata.example.net" in names.get_values_for_type(x509.DNSName)
    assert (first.key.stat().st_mode & 0o777) == 0o600


def test_plain_http_is_only_for_loopback_or_insecure(tmp_path: Path) -> None:
    assert server_certificate(ListenAddress("127.0.0.1", 8470), tmp_path) is None
    assert server_certificate(ListenAddress("::1", 8470), tmp_path) is None
    assert server_certificate(ListenAddress("10.0.0.5", 8470), tmp_path, insecure=True) is None
    assert server_certificate(ListenAddress("10.0.0.5", 8470), tmp_path) is not None
    with pytest.raises(StrataError, match="--insecure serves plain HTTP"):
        server_certificate(ListenAddress("10.0.0.5", 8470), tmp_path, insecure=True, tls=True)


@E2E
def test_server_prints_the_fingerprint(tls_server: Server) -> None:
    log = tls_server.log.read_text()
    assert f"Strata server on https://127.0.0.1:{tls_server.port}" in log
    assert cert_fingerprint(tls_server) in log


def test_an_administrators_certificate_chain_is_taken_as_given(tmp_path: Path) -> None:
    made = server_certificate(ListenAddress("127.0.0.1", 1), tmp_path / "made", tls=True)
    assert made is not None
    chain = tmp_path / "chain.pem"  # as openssl pkcs12 writes it: text, leaf, then CA
    chain.write_text("Bag Attributes\n    localKeyID: 01\n" + made.cert.read_text() * 2)
    given = server_certificate(ListenAddress("0.0.0.0", 1), tmp_path / "data",
                               tls_cert=chain, tls_key=made.key)
    assert given is not None and not given.self_signed
    assert given.fingerprint == made.fingerprint
    assert not (tmp_path / "data" / "tls").exists()  # nothing made when one is given


@E2E
def test_a_bad_certificate_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    proc = strata("server", "--data", tmp_path / "data", "--listen", "127.0.0.1:1",
                  "--tls-cert", tmp_path / "cert.pem", "--tls-key", tmp_path / "key.pem",
                  rc=None)
    assert_one_line_error(proc, "cannot use --tls-cert")


# -- the admin CLI ----------------------------------------------------------------------------


@E2E
def test_admin_cli_refuses_an_untrusted_certificate_in_one_line(tls_server: Server) -> None:
    proc = admin(tls_server, "endpoint", "list", rc=2)
    assert_one_line_error(proc, "TLS certificate", "not trusted", "--ca-cert")


@E2E
def test_admin_cli_trusts_a_ca_cert_or_a_fingerprint(tls_server: Server) -> None:
    admin(tls_server, "endpoint", "list", "--ca-cert", tls_server.data / "tls/cert.pem")
    fp = cert_fingerprint(tls_server)
    admin(tls_server, "endpoint", "list", "--server-fingerprint", fp)
    colons = ":".join(fp[i:i + 2] for i in range(0, 64, 2)).upper()
    admin(tls_server, "token", "create", "--server-fingerprint", f"SHA256:{colons}")
    wrong = admin(tls_server, "endpoint", "list", "--server-fingerprint", "0" * 64, rc=2)
    assert_one_line_error(wrong, "has fingerprint", "not " + "0" * 64)


@E2E
def test_clients_refuse_plain_http_to_another_machine(tmp_path: Path) -> None:
    # 192.0.2.0/24 is reserved for documentation: nothing is ever sent there.
    proc = strata("endpoint", "list", "--server", "http://192.0.2.10:8470", rc=2,
                  env={"STRATA_ADMIN_TOKEN": "sadm_x"})
    assert_one_line_error(proc, "refusing plain HTTP to 192.0.2.10", "--insecure")
    token = tmp_path / "token"
    token.write_text("senr_x\n")
    proc = strata("agent", "enroll", "--server", "http://192.0.2.10:8470", "--token-file",
                  token, "--root", tmp_path, "--state", tmp_path / "state", rc=2)
    assert_one_line_error(proc, "refusing plain HTTP to 192.0.2.10")
    assert not (tmp_path / "state" / "credential.json").exists()


def test_an_https_server_reached_with_http_is_named_whether_it_closes_or_resets() -> None:
    """Which of the two a client sees is a race (the request unread in the server's buffer
    turns its close into a reset): both name the likely mistake."""
    url = "http://127.0.0.1:8470"
    for exc in (httpx.RemoteProtocolError("Server disconnected without sending a response."),
                httpx.ReadError("[Errno 104] Connection reset by peer")):
        assert "an https:// server reached with http://" in describe_transport_error(url, exc)
    # Over https:// a reset is something else, said as it is.
    said = describe_transport_error("https://host:8470", httpx.ReadError(
        "[Errno 104] Connection reset by peer"))
    assert "reached with http://" not in said and "reset" in said.lower()


def test_check_server_url() -> None:
    assert check_server_url("http://127.0.0.1:8470/") == "http://127.0.0.1:8470"
    assert check_server_url("http://localhost:8470") == "http://localhost:8470"
    assert check_server_url("http://[::1]:8470") == "http://[::1]:8470"
    assert check_server_url("http://10.1.1.1:8470", insecure=True) == "http://10.1.1.1:8470"
    assert check_server_url("https://strata.example.net") == "https://strata.example.net"
    for bad in ("http://10.1.1.1:8470", "ftp://x", "strata:8470", "https://x:99999"):
        with pytest.raises(StrataError):
            check_server_url(bad)
    assert normalize_fingerprint("SHA256:" + "AB:" * 31 + "AB") == "ab" * 32


# -- agents -----------------------------------------------------------------------------------


def _agent_files(tmp_path: Path, token: str) -> tuple[Path, Path, Path]:
    root = tmp_path / "root"
    (root / "home/alice").mkdir(parents=True)
    (root / "home/alice/report.txt").write_text("quarterly figures\n")
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    return root, tmp_path / "state", token_file


@E2E
def test_agent_pins_the_certificate_at_enrollment_and_uses_it(tls_server: Server,
                                                              tmp_path: Path) -> None:
    root, state, token_file = _agent_files(tmp_path, tls_server.create_token())
    out = strata("agent", "enroll", "--server", tls_server.url, "--token-file", token_file,
                 "--server-fingerprint", cert_fingerprint(tls_server), "--root", root,
                 "--state", state, "--json")
    assert json.loads(out.stdout)["state"] == "active"
    cred = json.loads((state / "credential.json").read_text())
    assert cred["server"] == tls_server.url and cred["server_cert"]
    assert "senr_" not in (state / "credential.json").read_text()
    backup = json.loads(strata("agent", "backup", "--state", state, "--json").stdout)
    assert backup["centralized"], backup
    # Someone else's certificate at the same address (a server that was replaced, or one
    # in between) is refused with a plain reason, and nothing is sent.
    (state / "server-cert.pem").write_text(_other_certificate(tmp_path))
    proc = strata("agent", "backup", "--state", state, rc=3)
    assert "not trusted" in proc.stderr and "Traceback" not in proc.stderr


@E2E
def test_agent_enrollment_stops_on_a_wrong_fingerprint(tls_server: Server,
                                                       tmp_path: Path) -> None:
    token = tls_server.create_token()
    root, state, token_file = _agent_files(tmp_path, token)
    proc = strata("agent", "enroll", "--server", tls_server.url, "--token-file", token_file,
                  "--server-fingerprint", "ab" * 32, "--root", root, "--state", state, rc=2)
    assert_one_line_error(proc, "has fingerprint", "stopped")
    assert not (state / "credential.json").exists()
    # The token was never sent: it still enrolls.
    resp = httpx.post(tls_server.url + "/api/v1/agent/enroll", verify=tls_server.verify,
                      json={"token": token, "hostname": "h", "os": "linux"})
    assert resp.status_code == 200, resp.text


@E2E
def test_agent_without_trust_gets_one_line(tls_server: Server, tmp_path: Path) -> None:
    root, state, token_file = _agent_files(tmp_path, tls_server.create_token())
    proc = strata("agent", "enroll", "--server", tls_server.url, "--token-file", token_file,
                  "--root", root, "--state", state, rc=3)
    assert_one_line_error(proc, "not trusted", "--server-fingerprint", rc=3)


@E2E
def test_https_to_a_plain_http_server_says_so(tmp_path: Path) -> None:
    srv = Server(tmp_path / "plain", signing=False).start()
    try:
        proc = strata("endpoint", "list", "--server", f"https://127.0.0.1:{srv.port}",
                      "--admin-token-file", srv.token_file, rc=2)
        assert_one_line_error(proc, "does not answer TLS")
    finally:
        srv.stop()


def _other_certificate(tmp_path: Path) -> str:
    other = server_certificate(ListenAddress("127.0.0.1", 1), tmp_path / "other", tls=True)
    assert other is not None
    return other.cert.read_text()


def test_every_command_that_talks_to_the_server_takes_ca_cert_and_a_fingerprint() -> None:
    import inspect

    from strata.cli.main import build_app

    def commands(app: object) -> list[tuple[str, object]]:
        found = [(c.name or c.callback.__name__, c.callback)  # type: ignore[union-attr]
                 for c in app.registered_commands]  # type: ignore[attr-defined]
        for group in app.registered_groups:  # type: ignore[attr-defined]
            found += commands(group.typer_instance)
        return found
    talking = [(name, cb) for name, cb in commands(build_app(["strata"]))
               if "server" in inspect.signature(cb).parameters]  # type: ignore[arg-type]
    assert len(talking) > 30
    for name, callback in talking:
        params = inspect.signature(callback).parameters  # type: ignore[arg-type]
        assert {"ca_cert", "server_fingerprint", "insecure"} <= set(params), name


@E2E
def test_an_endpoint_follows_its_server_to_https_and_a_renewed_certificate(
        tmp_path: Path, tls_server: Server) -> None:
    srv = Server(tmp_path / "data", signing=False).start()  # plain HTTP on loopback
    try:
        root, state, token_file = _agent_files(tmp_path, srv.create_token())
        strata("agent", "enroll", "--server", srv.url, "--token-file", token_file,
               "--root", root, "--state", state)
        endpoint = json.loads((state / "credential.json").read_text())["endpoint_id"]
        srv.stop()
        srv.tls = True  # the upgrade: the same server, now serving HTTPS
        srv.start()
        proc = strata("agent", "backup", "--state", state, rc=3)
        assert "an https:// server reached with http://" in proc.stderr, proc.stderr
        out = strata("agent", "trust-server", "--server", srv.url, "--server-fingerprint",
                     cert_fingerprint(srv), "--state", state, "--json")
        assert json.loads(out.stdout)["server_trust"] == \
            f"pinned certificate {cert_fingerprint(srv)}"
        assert json.loads(strata("agent", "backup", "--state", state, "--json").stdout)[
            "centralized"]

        srv.stop()  # the certificate is renewed (made anew at the next start)
        shutil.rmtree(srv.data / "tls")
        srv.start()
        proc = strata("agent", "backup", "--state", state, rc=3)
        assert "not trusted" in proc.stderr, proc.stderr
        # Another server's certificate and address: it does not know this endpoint, so
        # nothing is changed.
        wrong = strata("agent", "trust-server", "--server", tls_server.url,
                       "--server-fingerprint", cert_fingerprint(tls_server), "--state", state,
                       rc=2)
        assert_one_line_error(wrong, "unknown device credential")
        strata("agent", "trust-server", "--server-fingerprint", cert_fingerprint(srv),
               "--state", state)
        status = json.loads(strata("agent", "status", "--state", state, "--json").stdout)
        assert status["endpoint_id"] == endpoint and status["access"] == "ok", status
        assert status["server_trust"] == f"pinned certificate {cert_fingerprint(srv)}"
    finally:
        srv.stop()


@E2E
def test_signing_and_admin_commands_over_tls(tmp_path: Path) -> None:
    """The whole admin side over HTTPS: signing set up through the CLI (it trusts the
    certificate through STRATA_CA_CERT), then admin commands with the signing keys."""
    srv = Server(tmp_path / "data", tls=True).start()  # signing init runs over TLS
    try:
        assert srv.keys.exists()
        shown = json.loads(srv.admin_cli("signing", "status", "--json").stdout)
        assert shown, shown
        srv.admin_cli("endpoint", "list")
    finally:
        srv.stop()


@E2E
def test_connection_failures_name_their_cause() -> None:
    closed = f"https://127.0.0.1:{free_port()}"
    proc = strata("endpoint", "list", "--server", closed, rc=2,
                  env={"STRATA_ADMIN_TOKEN": "sadm_x"})
    assert_one_line_error(proc, f"cannot reach {closed}: connection refused")
    assert "ConnectError" not in proc.stderr

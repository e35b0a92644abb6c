"""How a client (the agent, the admin CLI) reaches a server: which URLs it refuses to send
credentials to, which certificate it trusts, and what a failed connection is called.

Every request carries a secret (an enrollment token, a device credential, the admin
token), so plain HTTP is allowed only to this machine unless the user says `--insecure`.
A server's certificate is trusted through the system's CAs, a CA bundle (`--ca-cert`), or
a pin: the SHA-256 fingerprint the server printed at its first start, checked once and
then kept as the only certificate that server may present.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import socket
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from strata.errors import StrataError, transport_cause

FINGERPRINT_HINT = "64 hex digits, as `strata server` printed it"


def is_loopback_host(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_server_url(url: str, *, insecure: bool = False) -> str:
    """`url` without a trailing slash, or one line saying why no secret goes there."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StrataError(f"server URL {url!r} must look like https://HOST:PORT")
    try:
        parts.port  # noqa: B018  (parses the port: a bad one raises ValueError)
    except ValueError:
        raise StrataError(f"server URL {url!r} has a port that is not a number from 0 to "
                          "65535") from None
    if parts.scheme == "http" and not insecure and not is_loopback_host(parts.hostname):
        raise StrataError(f"refusing plain HTTP to {parts.hostname}: tokens and data would "
                          "cross the network in clear; use https:// (a server listening "
                          "beyond loopback serves HTTPS), or --insecure on a network you trust")
    return url.strip().rstrip("/")


def fingerprint(der: bytes) -> str:
    """The SHA-256 of a certificate (DER), as 64 lowercase hex digits."""
    return hashlib.sha256(der).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """What a person may paste: `sha256:` prefix, colons, spaces, either case."""
    digits = re.sub(r"[\s:]", "", text.strip().lower().removeprefix("sha256"))
    if not re.fullmatch(r"[0-9a-f]{64}", digits):
        raise StrataError(f"{text!r} is not a certificate fingerprint ({FINGERPRINT_HINT})")
    return digits


def fetch_pinned_certificate(url: str, expected: str, *, timeout: float = 30.0) -> str:
    """The server's certificate (PEM) if its fingerprint is `expected`; otherwise one line.
    Nothing is sent but the TLS handshake."""
    parts = urlsplit(url)
    if parts.scheme != "https":
        raise StrataError("--server-fingerprint pins a certificate: give an https:// URL")
    want = normalize_fingerprint(expected)
    host = parts.hostname or ""
    try:
        pem = ssl.get_server_certificate((host, parts.port or 443), timeout=timeout)
    except (OSError, ssl.SSLError) as exc:
        raise StrataError(f"cannot fetch the TLS certificate of {url}: "
                          f"{_os_reason(exc)}") from None
    got = fingerprint(ssl.PEM_cert_to_DER_cert(pem))
    if got != want:
        raise StrataError(f"the TLS certificate of {url} has fingerprint {got}, not {want}: "
                          "stopped (another server, or someone in between)")
    return pem


def certificate_file_fingerprint(path: str | Path) -> str:
    """The fingerprint of the (first) certificate in a PEM file, or why there is none."""
    try:
        return fingerprint(ssl.PEM_cert_to_DER_cert(Path(path).read_text()))
    except (OSError, ValueError) as exc:
        return f"(unreadable: {exc})"


@functools.cache
def system_trust() -> ssl.SSLContext:
    """The system's CAs, as httpx trusts them by default, loaded once per process: a client
    told `verify=True` loads the whole bundle again (35 ms of CPU), and a command makes
    several clients. A context is safe to share between clients and threads."""
    import httpx

    return httpx.create_ssl_context()


def verify_setting(ca_cert: str | Path | None = None, pinned_cert: str | Path | None = None,
                   *, pinned_pem: str = "") -> bool | ssl.SSLContext:
    """What httpx is told to verify: a pinned certificate (a file, or `pinned_pem` itself:
    trusted alone, whatever name the server is reached by), a CA bundle, or the system's
    CAs."""
    if pinned_cert or pinned_pem:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # the pin names the certificate itself
        ctx.verify_mode = ssl.CERT_REQUIRED
        if pinned_pem:
            ctx.load_verify_locations(cadata=pinned_pem)
        else:
            _load(ctx, pinned_cert or "", "pinned server certificate")
        return ctx
    if ca_cert:
        ctx = ssl.create_default_context()
        _load(ctx, ca_cert, "--ca-cert")
        return ctx
    return system_trust()


def _load(ctx: ssl.SSLContext, path: str | Path, what: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(path))
    except FileNotFoundError:
        raise StrataError(f"{what} {path}: no such file") from None
    except (OSError, ssl.SSLError) as exc:
        raise StrataError(f"{what} {path} is not a PEM certificate bundle "
                          f"({_os_reason(exc)})") from None


def describe_transport_error(server: str, exc: BaseException) -> str:
    """One line for a request that got no answer, naming the cause, not the exception."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            why = e.verify_message or e.reason or "verification failed"
            return (f"the TLS certificate of {server} is not trusted ({why}): give the "
                    "server's CA with --ca-cert FILE, or pin its certificate with "
                    "--server-fingerprint (printed by `strata server` at its first start)")
        if isinstance(e, ssl.SSLError):
            if "WRONG_VERSION_NUMBER" in str(e) or "record layer failure" in str(e):
                return (f"{server} does not answer TLS: is it a plain-HTTP server "
                        "(http:// on loopback)?")
            return f"TLS with {server} failed: {e.reason or e}"
    text = " ".join(str(e) for e in chain).lower()
    name = type(exc).__name__
    if "connection refused" in text or isinstance(exc, ConnectionRefusedError):
        return f"cannot reach {server}: connection refused (is the server running?)"
    if "name or service not known" in text or "nodename nor servname" in text or \
            any(isinstance(e, socket.gaierror) for e in chain):
        return f"cannot reach {server}: unknown host name"
    if name == "RemoteProtocolError":
        return (f"{server} closed the connection without an answer (an https:// server "
                "reached with http://?)")
    # A TLS server reached with plain HTTP closes at once; with the request still unread
    # in its buffer, the close is a reset (which of the two the client sees is a race).
    if "connection reset" in text and server.startswith("http://"):
        return (f"{server} reset the connection without an answer (an https:// server "
                "reached with http://?)")
    if name == "UnsupportedProtocol":
        return f"server URL {server!r} must start with https:// or http://"
    return f"cannot reach {server}: {transport_cause(exc)}"


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def is_certificate_error(exc: BaseException) -> bool:
    """Whether a connection failed on the server's certificate (retrying will not help)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False

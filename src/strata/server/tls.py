"""The server's TLS certificate: the administrator's own (`--tls-cert/--tls-key`), or a
self-signed one made at the first start in DATA/tls, whose fingerprint agents pin at
enrollment (`strata agent enroll --server-fingerprint FP`)."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from strata.errors import StrataError
from strata.server.listener import ListenAddress
from strata.transport import fingerprint

TLS_DIR = "tls"
VALID_DAYS = 3650  # renewing it means every agent pins again: make it last


@dataclass(frozen=True)
class ServerCertificate:
    cert: Path
    key: Path
    fingerprint: str  # SHA-256 of the certificate, 64 hex digits
    self_signed: bool
    created: bool = False  # made at this start


def server_certificate(address: ListenAddress, data_dir: Path, *, tls: bool = False,
                       tls_cert: Path | None = None, tls_key: Path | None = None,
                       tls_names: list[str] | None = None,
                       insecure: bool = False) -> ServerCertificate | None:
    """The certificate to serve with, or None for plain HTTP: HTTPS whenever the server
    listens beyond loopback (plain HTTP there only with `insecure`), and on loopback when
    asked (`tls`, or a certificate given)."""
    if bool(tls_cert) != bool(tls_key):
        raise StrataError("--tls-cert and --tls-key go together")
    if insecure and (tls or tls_cert):
        raise StrataError("--insecure serves plain HTTP: it does not go with --tls or "
                          "--tls-cert")
    if tls_cert and tls_key:
        return load_certificate(tls_cert, tls_key)
    if tls or not (address.is_loopback or insecure):
        names = [*(tls_names or []), *([] if address.is_wildcard else [address.host])]
        return self_signed_certificate(data_dir, names)
    return None


def load_certificate(cert: Path, key: Path) -> ServerCertificate:
    """The administrator's certificate and key, checked to load together (one line if not)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except FileNotFoundError as exc:
        raise StrataError(f"TLS certificate or key: no such file {exc.filename}") from None
    except (OSError, ssl.SSLError) as exc:
        reason = exc.reason if isinstance(exc, ssl.SSLError) else exc.strerror
        raise StrataError(f"cannot use --tls-cert {cert} with --tls-key {key}: "
                          f"{reason or exc}") from None
    # The first certificate of the file is the server's own (a chain follows it); text
    # around it (openssl's "Bag Attributes") is skipped.
    pem = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----",
                    cert.read_text(errors="replace"), re.S)
    if pem is None:
        raise StrataError(f"--tls-cert {cert} holds no PEM certificate")
    der = ssl.PEM_cert_to_DER_cert(pem.group(0) + "\n")
    return ServerCertificate(cert, key, fingerprint(der), self_signed=False)


def self_signed_certificate(data_dir: Path, names: list[str]) -> ServerCertificate:
    """DATA/tls/cert.pem and key.pem (0600), made on first use; `names` (host names and
    addresses the agents use) go into the certificate beside this machine's own names.
    Agents that pin the fingerprint do not need the name to match; `--ca-cert` does."""
    directory = data_dir / TLS_DIR
    cert, key = directory / "cert.pem", directory / "key.pem"
    created = False
    if not cert.exists() or not key.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _generate(cert, key, names)
        created = True
    loaded = load_certificate(cert, key)
    return ServerCertificate(cert, key, loaded.fingerprint, self_signed=True, created=created)


def _generate(cert_path: Path, key_path: Path, names: list[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    host = socket.gethostname()
    wanted = [*names, host, socket.getfqdn(), "localhost", "127.0.0.1", "::1"]
    dns: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for n in wanted:
        n = n.strip("[]")
        if not n or n in ("0.0.0.0", "::"):
            continue
        try:
            ip = ipaddress.ip_address(n)
        except ValueError:
            if n not in dns:
                dns.append(n)
        else:
            if ip not in ips:
                ips.append(ip)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Strata server {host}"[:64])])
    now = datetime.now(UTC)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(d) for d in dns] + [x509.IPAddress(i) for i in ips]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256()))
    # The key first: a certificate without its key would be reused and fail to load.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))

"""Where the server listens and what it holds while it runs: the listen address checked
and bound before anything is announced, and the data directory locked to one server."""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from strata.errors import StrataError

LOCK_NAME = "server.lock"
SHARED_MARK = "postgresql"  # in the lock file: held by servers of a PostgreSQL catalog


@dataclass(frozen=True)
class ListenAddress:
    host: str  # without brackets: 127.0.0.1, ::1, 0.0.0.0, a name
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """Only this machine can connect (a name counts only if it is localhost)."""
        if self.host.lower() in ("localhost", "localhost."):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def is_wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "::", "")


def parse_listen(text: str, option: str = "--listen") -> ListenAddress:
    """HOST:PORT (IPv6 as [::1]:PORT), the port between 1 and 65535."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise StrataError(f"{option} must be HOST:PORT, e.g. 127.0.0.1:8470, not {text!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise StrataError(f"{option} {text!r}: an IPv6 address goes in brackets, "
                              "e.g. [::1]:8470")
        host = host[1:-1]
    elif ":" in host:
        raise StrataError(f"{option} {text!r}: put an IPv6 address in brackets, "
                          "e.g. [::1]:8470")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise StrataError(f"{option} {text!r}: the port must be a number from 1 to 65535")
    return ListenAddress(host, int(port))


def bind(address: ListenAddress) -> socket.socket:
    """A listening socket on `address`, or one line saying why there is none."""
    try:
        infos = socket.getaddrinfo(address.host or None, address.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StrataError(f"cannot listen on {address}: {exc.strerror}") from None
    family, kind, proto, _, where = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address.is_wildcard:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(where)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = {errno.EADDRINUSE: "the address is already in use (another server?)",
                  errno.EACCES: "permission denied (ports below 1024 need privileges)",
                  errno.EADDRNOTAVAIL: "no interface of this machine has that address",
                  }.get(exc.errno or 0, exc.strerror or str(exc))
        raise StrataError(f"cannot listen on {address}: {reason}") from None
    sock.set_inheritable(True)
    return sock


class DataDirLock:
    """DATA/server.lock, held (flock) for as long as the server runs. With the SQLite
    catalog it is exclusive: two servers on one data directory would each keep their own
    upload sessions and caches, and the second one's prune would not see the first one's
    uploads in progress. With a PostgreSQL catalog (`shared`) it is a shared lock: what
    processes must agree on (index, locks, sessions, holdings, cache generation) is in
    that database, so several server processes may share the directory (its secrets,
    certificate and signed metadata), while an SQLite server is still kept out."""

    def __init__(self, data_dir: Path, *, shared: bool = False):
        self.path = data_dir / LOCK_NAME
        self.shared = shared
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            if self.shared:
                raise StrataError(f"a Strata server with an SQLite catalog is running on "
                                  f"{self.path.parent}" + (f" (pid {holder})" if
                                                            holder.isdigit() else "")
                                  + "; several processes need a PostgreSQL catalog") from None
            if holder == SHARED_MARK:
                raise StrataError(f"Strata servers with a PostgreSQL catalog are running on "
                                  f"{self.path.parent}: give this one the same --catalog "
                                  "to run beside them") from None
            raise StrataError(f"another Strata server is running on {self.path.parent}"
                              + (f" (pid {holder})" if holder.isdigit() else "")) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{SHARED_MARK if self.shared else os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def serve_metrics(address: ListenAddress) -> None:
    """/metrics without a token on its own address (a thread of prometheus_client's), for
    a Prometheus that reaches the server on a private network only."""
    from prometheus_client import start_http_server

    from strata.server import metrics

    try:
        start_http_server(address.port, address.host, registry=metrics.REGISTRY)
    except OSError as exc:
        raise StrataError(f"cannot serve metrics on {address}: "
                          f"{(exc.strerror or str(exc)).lower()}") from None

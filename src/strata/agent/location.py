"""Where the endpoint is, as the bandwidth rules match it: the site it was given
(`strata agent site NAME`, kept in STATE/site), the address and prefix it reaches the
server from (behind NAT or a VPN the server sees another), and its clock's offset from
UTC (rule windows are in the endpoint's local time)."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import struct
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

from strata.errors import StrataError
from strata.store.backend import atomic_write

SITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # as model/wire.py: SiteName
_SIOCGIFADDR, _SIOCGIFNETMASK = 0x8915, 0x891B  # Linux ioctls (IPv4)


def check_site(name: str) -> str:
    if not SITE.match(name):
        raise StrataError(f"not a site name: {name!r} (letters, digits, '.', '_', '-'; at "
                          "most 64)")
    return name


def read_site(state_dir: Path) -> str | None:
    try:
        name = (state_dir / "site").read_text().strip()
    except OSError:
        return None
    return name if SITE.match(name) else None


def write_site(state_dir: Path, name: str | None) -> None:
    """Give the endpoint a site (None: none); reported from the next check-in on."""
    if name is None:
        (state_dir / "site").unlink(missing_ok=True)
        return
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(state_dir / "site", check_site(name).encode() + b"\n")


def local_subnet(server: str) -> str | None:
    """'10.20.3.4/16': the local address that routes to `server`, with its interface's
    prefix where the system tells it (Linux, IPv4), else the bare address. No packet is
    sent (a UDP socket only picks its route)."""
    parts = urlsplit(server)
    host, port = parts.hostname or "", parts.port or 443
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            address = s.getsockname()[0]
    except OSError:
        return None
    prefix = _ipv4_prefix(address) if family == socket.AF_INET else None
    return f"{address}/{prefix}" if prefix is not None else address


def _ipv4_prefix(address: str) -> int | None:
    try:
        import fcntl
    except ImportError:  # not a Unix system: the bare address is reported
        return None
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            req = struct.pack("256s", name.encode()[:15])
            try:
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24])
            except OSError:
                continue  # an interface without an IPv4 address
            if addr == address:
                mask = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFNETMASK, req)[20:24])
                return ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen
    return None


def utc_offset_minutes(now: float | None = None) -> int:
    """The local clock's offset from UTC now (daylight saving included)."""
    offset = datetime.fromtimestamp(time.time() if now is None else now).astimezone().utcoffset()
    return int(offset.total_seconds() // 60) if offset is not None else 0

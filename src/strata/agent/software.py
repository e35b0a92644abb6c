"""The installed packages of the endpoint's tree (dpkg's status database, or rpm's
SQLite database), read as files under the agent's root: no package tool is run, so it
works the same for `/` and for a mounted disk or a VM's root. Sent to the server with the
inventory when the list changes (or a day has passed)."""

from __future__ import annotations

import logging
import sqlite3
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from strata.agent.client import ServerClient
from strata.agent.state import AgentState
from strata.errors import StrataError
from strata.model.software import (
    MAX_PACKAGES,
    InstalledPackage,
    SoftwareReport,
    software_digest,
)

log = logging.getLogger("strata.agent")
DPKG_STATUS = "var/lib/dpkg/status"
RPM_SQLITE = "var/lib/rpm/rpmdb.sqlite"  # rpm >= 4.16 (Fedora 33+, RHEL 9)
MAX_DATABASE_BYTES = 256 << 20  # a status file this big is not a real one
RESEND_SECONDS = 24 * 3600  # sent again unchanged once a day (a server that lost it)


# -- dpkg --------------------------------------------------------------------------------------


def _paragraphs(text: str) -> Iterator[dict[str, str]]:
    """deb822 paragraphs: `Field: value` lines, continuation lines start with a space."""
    fields: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if fields:
                yield fields
            fields, last = {}, ""
        elif line[0] in " \t":
            if last:
                fields[last] += "\n" + line.strip()
        else:
            key, sep, value = line.partition(":")
            if sep:
                last = key.strip()
                fields[last] = value.strip()
    if fields:
        yield fields


def dpkg_packages(status: bytes) -> list[InstalledPackage]:
    """The packages dpkg calls installed (`Status: install ok installed`, or held)."""
    out: dict[tuple[str, str], InstalledPackage] = {}
    for p in _paragraphs(status.decode("utf-8", "replace")):
        if p.get("Status", "").split()[-1:] != ["installed"]:
            continue  # config-files, half-installed, not-installed...
        pkg = _package(p.get("Package", ""), p.get("Version", ""), p.get("Architecture", ""),
                       "dpkg")
        if pkg is not None:
            out.setdefault((pkg.name, pkg.arch), pkg)
    return list(out.values())


def _package(name: str, version: str, arch: str,
             manager: Literal["dpkg", "rpm"]) -> InstalledPackage | None:
    """A package, or None for one whose fields are not what a package manager writes (the
    server would refuse the whole list for it)."""
    try:
        return InstalledPackage(name=name, version=version, arch=arch, manager=manager)
    except ValidationError:
        log.warning("skipping a package with unexpected fields: %r", name[:80])
        return None


# -- rpm ---------------------------------------------------------------------------------------

_RPM_TAGS = {1000: "name", 1001: "version", 1002: "release", 1003: "epoch", 1022: "arch"}
_STRING, _INT32 = 6, 4


def rpm_header(blob: bytes) -> dict[str, str | int]:
    """Name, version, release, epoch and arch from one rpm header blob (as rpmdb.sqlite's
    Packages table keeps it: index count, data length, 16-byte index entries, data; big
    endian). Entries of other tags and types are skipped; anything out of bounds raises
    ValueError."""
    if len(blob) < 8:
        raise ValueError("short header")
    count, size = struct.unpack_from(">II", blob, 0)
    data_at = 8 + 16 * count
    if count > 100_000 or data_at + size > len(blob):
        raise ValueError("header out of bounds")
    out: dict[str, str | int] = {}
    for i in range(count):
        tag, kind, offset, n = struct.unpack_from(">IIII", blob, 8 + 16 * i)
        field = _RPM_TAGS.get(tag)
        if field is None or offset >= size:
            continue
        at = data_at + offset
        if kind == _STRING:
            end = blob.find(b"\0", at, data_at + size)
            if end < 0:
                raise ValueError("unterminated string")
            out[field] = blob[at:end].decode("utf-8", "replace")
        elif kind == _INT32 and n >= 1 and at + 4 <= data_at + size:
            out[field] = struct.unpack_from(">I", blob, at)[0]
    return out


def rpm_packages(database: Path) -> list[InstalledPackage]:
    # Read-only and immutable: the agent never locks or changes the endpoint's database.
    db = sqlite3.connect(f"file:{database}?mode=ro&immutable=1", uri=True)
    try:
        blobs = db.execute("SELECT blob FROM Packages LIMIT ?", (MAX_PACKAGES + 1,))
        out: dict[tuple[str, str], InstalledPackage] = {}
        for (blob,) in blobs:
            try:
                h = rpm_header(bytes(blob))
            except ValueError:
                continue
            if h.get("name") == "gpg-pubkey" or "name" not in h:
                continue  # imported signing keys are listed as packages
            version = f"{h.get('version', '')}-{h.get('release', '')}"
            if h.get("epoch"):
                version = f"{h['epoch']}:{version}"
            pkg = _package(str(h["name"]), version, str(h.get("arch", "")), "rpm")
            if pkg is not None:
                out.setdefault((pkg.name, pkg.arch), pkg)
        return list(out.values())
    finally:
        db.close()


# -- both --------------------------------------------------------------------------------------


def installed_packages(root: Path) -> list[InstalledPackage] | None:
    """The tree's installed packages, or None when it has no package database we read
    (a Windows tree, a plain folder). At most MAX_PACKAGES are kept."""
    found: list[InstalledPackage] | None = None
    dpkg = root / DPKG_STATUS
    rpm = root / RPM_SQLITE
    try:
        if dpkg.is_file() and dpkg.stat().st_size <= MAX_DATABASE_BYTES:
            found = dpkg_packages(dpkg.read_bytes())
        if rpm.is_file():
            found = (found or []) + rpm_packages(rpm)
    except (OSError, sqlite3.Error) as exc:
        log.warning("cannot read the package database under %s: %s", root, exc)
        return None
    return sorted(found, key=lambda p: (p.name, p.arch))[:MAX_PACKAGES] \
        if found is not None else None


def report_software(client: ServerClient, state: AgentState, root: Path, *,
                    now: float | None = None) -> bool:
    """Send the package list if it changed since the server last stored it (or a day
    passed); True if sent. A failure only waits for the next check-in."""
    packages = installed_packages(root)
    if packages is None:
        return False
    digest = software_digest(packages)
    now = time.time() if now is None else now
    last = state.status().get("software") or {}
    if last.get("digest") == digest and now - float(last.get("at", 0)) < RESEND_SECONDS:
        return False
    body = SoftwareReport(packages=packages).model_dump()
    try:
        resp = client.request("POST", "/api/v1/agent/software", json=body, retries=1)
    except StrataError as exc:
        log.warning("the package list was not sent: %s", exc)
        return False
    if resp.json().get("digest") == digest:
        state.update_status(software={"digest": digest, "at": now,
                                      "packages": len(packages)})
    return True

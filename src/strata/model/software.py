"""Installed software as an endpoint reports it (dpkg or rpm packages), and the fleet
reports built from it. The wire shape is shared by the agent, which sends it, and the
server, which bounds and checks every field before it is stored: names, versions and
architectures come from a file on the endpoint, so they are hostile text."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, StringConstraints

MAX_PACKAGES = 20_000  # a full Debian desktop has ~3,000; a list beyond this is refused
# Debian policy: lower case, digits, + - . (rpm also allows upper case and _).
PackageName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9+._-]{0,127}$")]
# [epoch:]upstream[-revision]: printable, no space or control character.
PackageVersion = Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]{1,128}$")]
PackageArch = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{0,32}$")]


class InstalledPackage(BaseModel):
    name: PackageName
    version: PackageVersion
    arch: PackageArch = ""
    manager: Literal["dpkg", "rpm"]


def _one_of_each(packages: list[InstalledPackage]) -> list[InstalledPackage]:
    seen = set()
    for p in packages:
        if (p.name, p.arch) in seen:
            raise ValueError(f"package {p.name}:{p.arch} is listed twice")
        seen.add((p.name, p.arch))
    return packages


class SoftwareReport(BaseModel):
    """POST /api/v1/agent/software: the endpoint's whole list (it replaces the last)."""

    packages: Annotated[list[InstalledPackage], Field(max_length=MAX_PACKAGES),
                        AfterValidator(_one_of_each)]


def software_digest(packages: list[InstalledPackage]) -> str:
    """The same on the agent and the server: the agent sends its list again only when
    this changes (or a day has passed)."""
    rows = sorted((p.manager, p.name, p.arch, p.version) for p in packages)
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


class SoftwareStored(BaseModel):
    digest: str
    packages: int


class SoftwareListInfo(BaseModel):
    packages: int
    updated_at: datetime  # when the endpoint last sent it (changed or not)


# -- reports ---------------------------------------------------------------------------------


class PackageOnEndpoint(BaseModel):
    """One row of the software report: a package on an endpoint."""

    endpoint: str
    hostname: str
    name: str
    version: str
    arch: str
    manager: str


class SoftwareSummary(BaseModel):
    """A package across the fleet: on how many endpoints, at which versions."""

    name: str
    endpoints: int
    versions: dict[str, int]  # version -> endpoints


class SoftwareReportPage(BaseModel):
    """`report software`: with --package or --endpoint, the matching rows (at most
    `limit`; `total` says how many there are); otherwise a summary per package."""

    rows: list[PackageOnEndpoint] = Field(default_factory=list)
    summary: list[SoftwareSummary] = Field(default_factory=list)
    total: int
    reporting: int  # endpoints that have sent a list


class CvdStorage(BaseModel):
    """One CVD's storage: what its snapshots name (logical), what only it references in
    the store (unique: what deleting it would free), and that part's share of the store."""

    endpoint: str
    hostname: str
    snapshots: int
    logical_bytes: int  # sum of its snapshots' sizes (the cost without any dedup)
    unique_bytes: int  # raw bytes of the chunks only this CVD references
    unique_stored_bytes: int  # their size in the store (compressed)
    share: float  # unique_stored_bytes / store_bytes, in percent


class StorageReport(BaseModel):
    cvds: list[CvdStorage]
    store_bytes: int  # every chunk's stored size (after dedup and compression)
    computed_at: datetime  # computed in the background at most every 10 minutes

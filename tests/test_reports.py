"""Reports: installed software read from the endpoint's package databases (dpkg's status
file, rpm's SQLite database) as files under the agent's root, sent when it changes,
bounded and checked by the server, each endpoint writing only its own list; the fleet's
"which endpoints have X, at which version"; storage per CVD (logical, unique, share of the
store); the console pages and CSV of every console table."""

from __future__ import annotations

import csv
import io
import re
import sqlite3
import struct
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from strata.agent.software import dpkg_packages, installed_packages, rpm_header, rpm_packages
from strata.engine.backup import backup
from strata.model.software import MAX_PACKAGES, InstalledPackage, SoftwareReport
from strata.server.app import create_app
from strata.server.catalog.models import Endpoint, SnapshotRecord
from strata.server.context import ServerContext, ServerSettings
from strata.server.rate_limit import TooManyRequests
from strata.server.services import snapshots, software
from strata.server.services.storage_report import compute_storage_report

ADMIN = "/api/v1/admin"
PASSWORD = "correct horse battery"

DPKG_STATUS = """\
Package: openssl
Status: install ok installed
Priority: optional
Architecture: amd64
Version: 3.0.15-1~deb12u1
Description: Secure Sockets Layer toolkit
 This package contains the openssl binary
 .
 and related tools.

Package: libc6
Status: install ok installed
Architecture: amd64
Multi-Arch: same
Version: 2.36-9+deb12u9

Package: libc6
Status: hold ok installed
Architecture: i386
Version: 2.36-9+deb12u9

Package: old-tool
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: half
Status: install reinstreq half-installed
Architecture: all
Version: 2

Package: <script>alert(1)</script>
Status: install ok installed
Architecture: all
Version: 1
"""


# -- reading the package databases -------------------------------------------------------------


def test_dpkg_status_gives_the_installed_packages_only():
    pkgs = {(p.name, p.arch): p.version for p in dpkg_packages(DPKG_STATUS.encode())}
    assert pkgs == {("openssl", "amd64"): "3.0.15-1~deb12u1",
                    ("libc6", "amd64"): "2.36-9+deb12u9",
                    ("libc6", "i386"): "2.36-9+deb12u9"}  # held counts; a hostile name not


def _rpm_blob(tags: dict[int, str | int]) -> bytes:
    """An rpm header as rpmdb.sqlite stores it (count, data size, entries, data; big
    endian): what the reader must parse, written from the format, not from the reader."""
    entries, data = b"", b""
    for tag, value in tags.items():
        if isinstance(value, int):
            data += b"\0" * (-len(data) % 4)  # INT32 is aligned
            entries += struct.pack(">IIII", tag, 4, len(data), 1)
            data += struct.pack(">I", value)
        else:
            entries += struct.pack(">IIII", tag, 6, len(data), 1)
            data += value.encode() + b"\0"
    return struct.pack(">II", len(tags), len(data)) + entries + data


def _rpmdb(path: Path, headers: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE Packages (hnum INTEGER PRIMARY KEY AUTOINCREMENT, "
               "blob BLOB NOT NULL)")
    db.executemany("INSERT INTO Packages (blob) VALUES (?)", [(h,) for h in headers])
    db.commit()
    db.close()
    return path


def test_rpm_packages_are_read_from_rpmdb_sqlite(tmp_path):
    rpmdb = _rpmdb(tmp_path / "var/lib/rpm/rpmdb.sqlite", [
        _rpm_blob({1000: "bash", 1001: "5.2.26", 1002: "3.fc40", 1022: "x86_64"}),
        _rpm_blob({1000: "shadow-utils", 1003: 2, 1001: "4.15.1", 1002: "1.fc40",
                   1022: "x86_64"}),
        _rpm_blob({1000: "gpg-pubkey", 1001: "a15b79cc", 1002: "63d04c2c"}),
        b"\xff\xff\xff\xff garbage",
        _rpm_blob({1000: "broken"})[:-3],  # the name's string runs off the end
    ])
    got = {(p.name, p.version, p.arch) for p in rpm_packages(rpmdb)}
    assert got == {("bash", "5.2.26-3.fc40", "x86_64"),
                   ("shadow-utils", "2:4.15.1-1.fc40", "x86_64")}
    assert {p.manager for p in installed_packages(tmp_path) or []} == {"rpm"}


def test_rpm_header_bounds_are_checked():
    with pytest.raises(ValueError):
        rpm_header(struct.pack(">II", 3, 1000))  # claims more than it has
    with pytest.raises(ValueError):
        rpm_header(b"\0\0")


def test_a_tree_without_a_package_database_reports_nothing(tmp_path):
    assert installed_packages(tmp_path) is None  # a Windows tree, a plain folder


# -- the server ---------------------------------------------------------------------------------


@pytest.fixture()
def fleet(tmp_path: Path) -> Iterator[SimpleNamespace]:
    app = create_app(ServerSettings(data_dir=tmp_path / "data"))
    ctx: ServerContext = app.state.ctx
    token = (tmp_path / "data/admin.token").read_text().strip()
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        devices = {}
        for host in ("pc-1", "pc-2", "=cmd|' /C calc'!A0"):
            tok = client.post(f"{ADMIN}/tokens", json={"uses": 1}).json()["token"]
            resp = client.post("/api/v1/agent/enroll", headers={"Authorization": ""},
                               json={"token": tok, "hostname": host, "os": "debian"})
            devices[host] = (resp.json()["endpoint_id"], resp.json()["credential"])
        client.post(f"{ADMIN}/users", json={"name": "hana", "role": "help-desk",
                                             "password": PASSWORD})
        yield SimpleNamespace(ctx=ctx, client=client, devices=devices, app=app)


def _send(f: SimpleNamespace, host: str, packages: list[dict]) -> object:
    return f.client.post("/api/v1/agent/software", json={"packages": packages},
                         headers={"Authorization": f"Bearer {f.devices[host][1]}"})


def _pkg(name: str, version: str, arch: str = "amd64", manager: str = "dpkg") -> dict:
    return {"name": name, "version": version, "arch": arch, "manager": manager}


def test_which_endpoints_have_a_package_and_at_which_version(fleet):
    assert _send(fleet, "pc-1", [_pkg("openssl", "3.0.15"), _pkg("libssl3", "3.0.15"),
                                 _pkg("bash", "5.2")]).status_code == 200
    assert _send(fleet, "pc-2", [_pkg("openssl", "3.0.11"), _pkg("bash", "5.2")]
                 ).status_code == 200
    doc = fleet.client.get(f"{ADMIN}/reports/software", params={"package": "openssl"}).json()
    assert {(r["hostname"], r["version"]) for r in doc["rows"]} == \
        {("pc-1", "3.0.15"), ("pc-2", "3.0.11")}
    assert doc["total"] == 2 and doc["reporting"] == 2
    doc = fleet.client.get(f"{ADMIN}/reports/software", params={"package": "libssl*"}).json()
    assert [r["name"] for r in doc["rows"]] == ["libssl3"]
    eid = fleet.devices["pc-2"][0]
    doc = fleet.client.get(f"{ADMIN}/reports/software", params={"endpoint": eid[:8]}).json()
    assert sorted(r["name"] for r in doc["rows"]) == ["bash", "openssl"]
    summary = {s["name"]: s for s in fleet.client.get(f"{ADMIN}/reports/software"
                                                      ).json()["summary"]}
    assert summary["openssl"]["endpoints"] == 2
    assert summary["openssl"]["versions"] == {"3.0.11": 1, "3.0.15": 1}
    assert summary["bash"]["versions"] == {"5.2": 2}
    # A prefix is text, not a LIKE pattern; a name of other characters is refused.
    doc = fleet.client.get(f"{ADMIN}/reports/software", params={"package": "%"})
    assert doc.status_code == 422


def test_hostile_package_lists_are_refused_whole_and_touch_only_their_own_rows(fleet):
    assert _send(fleet, "pc-1", [_pkg("bash", "5.2")]).status_code == 200
    other = fleet.devices["pc-1"][0]
    hostile = [
        [_pkg("<script>", "1")],
        [_pkg("bash", "5.2 ; rm -rf /")],  # a space or control character in a version
        [_pkg("bash", "x" * 129)],
        [_pkg("bash", "1", arch="../../x")],
        [_pkg("bash", "1", manager="apt")],
        [_pkg("bash", "1"), _pkg("bash", "2")],  # the same package twice
        [_pkg(f"p{i}", "1") for i in range(MAX_PACKAGES + 1)],
    ]
    for packages in hostile:
        resp = _send(fleet, "pc-2", packages)
        assert resp.status_code in (413, 422), (packages[:1], resp.status_code)
    # Another endpoint's id in the body is not a field: the rows are the sender's own.
    resp = fleet.client.post("/api/v1/agent/software", json={
        "endpoint_id": other, "packages": [_pkg("evil", "1")]},
        headers={"Authorization": f"Bearer {fleet.devices['pc-2'][1]}"})
    assert resp.status_code == 200
    rows = fleet.client.get(f"{ADMIN}/reports/software", params={"package": "*"}).json()
    assert {(r["hostname"], r["name"]) for r in rows["rows"]} == {("pc-1", "bash"),
                                                                  ("pc-2", "evil")}
    # No credential, no list.
    resp = fleet.client.post("/api/v1/agent/software", headers={"Authorization": ""},
                             json={"packages": []})
    assert resp.status_code == 401


def test_a_changed_list_replaces_the_last_at_most_once_a_minute(fleet):
    ctx = fleet.ctx
    with ctx.session() as db:
        ep = db.get(Endpoint, fleet.devices["pc-1"][0])
    first = SoftwareReport(packages=[InstalledPackage(name="a", version="1", manager="dpkg")])
    second = SoftwareReport(packages=[InstalledPackage(name="b", version="1", manager="dpkg")])
    t0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    software.store_software(ctx, ep, first, now=t0)
    assert software.store_software(ctx, ep, first, now=t0 + timedelta(seconds=1)).packages == 1
    with pytest.raises(TooManyRequests) as refused:
        software.store_software(ctx, ep, second, now=t0 + timedelta(seconds=30))
    assert refused.value.retry_after >= 29
    software.store_software(ctx, ep, second, now=t0 + timedelta(seconds=61))
    rows = software.software_report(ctx, endpoint=ep.id).rows
    assert [r.name for r in rows] == ["b"]


def _centralize(ctx: ServerContext, endpoint_id: str, src: Path) -> str:
    sid = backup(ctx.store, src).snapshot
    with ctx.write() as db:
        cvd = snapshots.cvd_of(db, endpoint_id)
        assert cvd is not None
        db.add(SnapshotRecord(id=sid, cvd_id=cvd.id, time=datetime.now(UTC),
                              bytes_total=sum(p.stat().st_size for p in src.rglob("*")
                                              if p.is_file())))
    return sid


def test_storage_per_cvd_counts_what_only_it_references(fleet, tmp_path):
    ctx = fleet.ctx
    shared = bytes(range(256)) * 2000  # 512,000 bytes both endpoints have
    one, two = tmp_path / "one", tmp_path / "two"
    for root, seed in ((one, 1), (two, 2)):
        (root / "usr").mkdir(parents=True)
        (root / "usr/lib.so").write_bytes(shared)
        (root / "home").mkdir()
        (root / "home/own.bin").write_bytes(bytes([seed]) * 100_000 + seed.to_bytes(4, "big")
                                            * 30_000)
    _centralize(ctx, fleet.devices["pc-1"][0], one)
    _centralize(ctx, fleet.devices["pc-1"][0], one)  # the same again: no more unique bytes
    _centralize(ctx, fleet.devices["pc-2"][0], two)
    report = compute_storage_report(ctx)
    by_host = {c.hostname: c for c in report.cvds}
    a, b = by_host["pc-1"], by_host["pc-2"]
    assert a.snapshots == 2 and a.logical_bytes == 2 * (512_000 + 220_000)
    assert b.snapshots == 1 and b.logical_bytes == 512_000 + 220_000
    # Unique: its own file's chunks and its manifests, never the shared library.
    assert 220_000 <= a.unique_bytes < 220_000 + 20_000, a
    assert 220_000 <= b.unique_bytes < 220_000 + 20_000, b
    assert by_host["=cmd|' /C calc'!A0"].unique_bytes == 0
    assert 0 < a.share < 100 and report.store_bytes > a.unique_stored_bytes
    total_unique = sum(c.unique_stored_bytes for c in report.cvds)
    assert total_unique < report.store_bytes  # the shared library is no one's own
    api = fleet.client.get(f"{ADMIN}/reports/storage").json()
    assert {c["hostname"] for c in api["cvds"]} == set(by_host)


# -- the console ------------------------------------------------------------------------------


def _sign_in(client: TestClient, name: str) -> None:
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text)
    assert token
    resp = client.post("/login", data={"name": name, "password": PASSWORD,
                                       "csrf": token.group(1)}, follow_redirects=False)
    assert resp.status_code == 303


def test_the_console_reports_software_and_storage_with_csv(fleet):
    _send(fleet, "pc-1", [_pkg("openssl", "3.0.15")])
    _send(fleet, "=cmd|' /C calc'!A0", [_pkg("openssl", "3.0.11")])
    c = TestClient(fleet.app)
    _sign_in(c, "hana")
    page = c.get("/reports/software", params={"package": "openssl"}).text
    assert page.count('data-testid="software-row"') == 2 and "3.0.11" in page
    rows = list(csv.reader(io.StringIO(c.get("/reports/software", params={
        "package": "openssl", "format": "csv"}).text)))
    assert rows[0] == ["endpoint", "hostname", "package", "version", "arch", "manager"]
    assert sorted(r[1] for r in rows[1:]) == ["'=cmd|' /C calc'!A0", "pc-1"]
    software.summary_of(fleet.ctx).get(wait=True)
    page = c.get("/reports/software").text
    assert "openssl" in page and "3.0.11 (1), 3.0.15 (1)" in page
    rows = list(csv.reader(io.StringIO(c.get("/reports/software?format=csv").text)))
    assert rows[1:] == [["openssl", "2", "3.0.11", "1"], ["openssl", "2", "3.0.15", "1"]]
    eid = fleet.devices["pc-1"][0]
    page = c.get(f"/endpoints/{eid}").text
    assert f'href="/reports/software?endpoint={eid}"' in page and "1 installed packages" in page
    assert "no package list reported" in c.get(f"/endpoints/{fleet.devices['pc-2'][0]}").text
    page = c.get("/reports/storage")
    assert page.status_code == 200
    rows = list(csv.reader(io.StringIO(c.get("/reports/storage?format=csv").text)))
    assert rows[0][:4] == ["endpoint", "hostname", "snapshots", "logical_bytes"]
    assert len(rows) == 4
    assert 'data-testid="storage-row"' in c.get("/reports/storage").text


def test_every_console_table_has_a_csv_link_that_exports_it(fleet):
    c = TestClient(fleet.app)
    _sign_in(c, "hana")
    page = c.get("/compliance").text
    links = re.findall(r'<a href="([^"]+)" data-testid="csv-link">CSV</a>', page)
    assert links and all("format=csv" in link for link in links)
    resp = c.get("/compliance" + links[-1].replace("&amp;", "&"))
    assert resp.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(resp.text)))
    assert rows[0][0] == "Endpoint" and len(rows) == 4  # the three endpoints
    assert "'=cmd|' /C calc'!A0" in {r[0] for r in rows}  # a formula stays text
    assert c.get("/compliance?format=csv&table=9").status_code == 404

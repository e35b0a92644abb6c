"""The file portal: an end user signs in with the account the help desk set up and reads
only their own folder in their own endpoint's snapshots: browse by date, search by name,
download a file. Another endpoint's snapshot, a path outside their folder, a file in it
that its owner could not read (a hard link to a root-only file), a symlink: refused, by
URL guessing too."""

from __future__ import annotations

import io
import os
import re
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

import web
from server_fixtures import Server, assert_one_line_error, strata
from strata.cli.confirm import NotConfirmed
from strata.engine.backup import backup
from strata.server.app import create_app
from strata.server.catalog.models import SnapshotRecord
from strata.server.context import ServerContext, ServerSettings
from strata.server.services import snapshots

ADMIN = "/api/v1/admin"
PASSWORD = "alice's long password"
ALICE = 1000  # the uid of alice's home folder in the endpoint's tree


def _centralize(ctx: ServerContext, endpoint_id: str, src: Path) -> str:
    sid = backup(ctx.store, src).snapshot
    with ctx.write() as db:
        cvd = snapshots.cvd_of(db, endpoint_id)
        db.add(SnapshotRecord(id=sid, cvd_id=cvd.id, time=datetime.now(UTC)))
        cvd.last_snapshot = sid
    return sid


def _laptop(root: Path) -> None:
    """A machine with alice's home (hers, uid 1000), system files, and two traps in her
    folder: a hard link to a root-only file and a symlink to it."""
    docs = root / "home/alice/Documents"
    docs.mkdir(parents=True)
    (docs / "report.txt").write_bytes(b"alice's quarterly report\n")
    (root / "home/alice/notes.txt").write_bytes(b"notes\n")
    (root / "etc").mkdir()
    (root / "etc/passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    (root / "etc/shadow").write_bytes(b"root:$6$secret\n")
    os.chmod(root / "etc/shadow", 0o640)
    os.link(root / "etc/shadow", root / "home/alice/shadow-copy")
    os.symlink("/etc/shadow", root / "home/alice/shadow-link")
    locked = root / "home/alice/locked"  # root's, 0700: what is inside stays hidden
    locked.mkdir()
    (locked / "inside.txt").write_bytes(b"behind a folder she cannot open\n")
    (locked / "sub").mkdir()
    (locked / "sub/deeper.txt").write_bytes(b"x")
    for p in (locked / "inside.txt", locked / "sub", locked / "sub/deeper.txt"):
        os.chown(p, ALICE, ALICE)
    os.chmod(locked, 0o700)
    (root / "home/bob").mkdir()
    (root / "home/bob/private.txt").write_bytes(b"bob's\n")
    for p in (root / "home/alice", docs, docs / "report.txt", root / "home/alice/notes.txt"):
        os.chown(p, ALICE, ALICE)


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[SimpleNamespace]:
    app = create_app(ServerSettings(data_dir=tmp_path / "data"))
    ctx: ServerContext = app.state.ctx
    api = {"Authorization": "Bearer " + (tmp_path / "data/admin.token").read_text().strip()}
    _laptop(tmp_path / "laptop")
    (tmp_path / "other/home/alice").mkdir(parents=True)
    (tmp_path / "other/home/alice/theirs.txt").write_bytes(b"another endpoint's alice\n")
    with TestClient(app) as c:
        ids = []
        for host in ("laptop", "other"):
            tok = c.post(f"{ADMIN}/tokens", headers=api, json={"uses": 1}).json()["token"]
            ids.append(c.post("/api/v1/agent/enroll", json={
                "token": tok, "hostname": host, "os": "debian"}).json()["endpoint_id"])
        sid = _centralize(ctx, ids[0], tmp_path / "laptop")
        other_sid = _centralize(ctx, ids[1], tmp_path / "other")
        resp = c.post(f"{ADMIN}/endpoints/{ids[0]}/portal-accounts", headers=api,
                      json={"name": "alice", "password": PASSWORD})
        assert resp.status_code == 200, resp.text
        assert resp.json()["home"] == "home/alice"
        yield SimpleNamespace(app=app, ctx=ctx, client=c, api=api, ep=ids[0], other=ids[1],
                              sid=sid, other_sid=other_sid)


def _sign_in(c: TestClient, name: str = "alice", password: str = PASSWORD) -> int:
    page = c.get("/portal/login").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf
    return c.post("/portal/login", data={"name": name, "password": password,
                                         "csrf": csrf.group(1)},
                  follow_redirects=False).status_code


def _hx(path: bytes) -> str:
    return path.hex()


def test_a_portal_user_browses_and_downloads_their_own_files(world):
    c = world.client
    assert c.get("/portal", follow_redirects=False).headers["location"] == "/portal/login"
    assert _sign_in(c, password="wrong password!") == 401
    assert _sign_in(c) == 303
    home = c.get("/portal").text
    assert home.count('data-testid="portal-snapshot"') == 1 and world.sid in home
    page = c.get(f"/portal/snapshots/{world.sid}").text
    names = re.findall(r'data-testid="portal-entry">\s*<td>(?:<a [^>]+>)?([^<]+)', page)
    # Documents and notes are hers; the hard link to the root-only file is hidden.
    assert sorted(names) == ["Documents/", "notes.txt", "shadow-link"]
    resp = c.get(f"/portal/snapshots/{world.sid}/download",
                 params={"path_hex": _hx(b"home/alice/Documents/report.txt")})
    assert resp.status_code == 200 and resp.content == b"alice's quarterly report\n"
    for url in ("/portal", f"/portal/snapshots/{world.sid}", "/portal/snapshots/nope"):
        resp = c.get(url)
        assert "script-src 'self'" in resp.headers["content-security-policy"], url
        assert not re.search(r"<script|\s(on\w+|style)=", resp.text), url
    found = c.get(f"/portal/snapshots/{world.sid}", params={"q": "REPORT"}).text
    assert "Documents/report.txt" in found
    assert "Nothing found" in c.get(f"/portal/snapshots/{world.sid}",
                                    params={"q": "shadow-copy"}).text
    log = c.get(f"{ADMIN}/audit", headers=world.api).json()
    assert {"actor": "portal:alice", "action": "snapshot-download"}.items() <= log[0].items()
    # Her whole folder as a zip: what she may see in it, nothing else.
    resp = c.get(f"/portal/snapshots/{world.sid}/download", params={"path_hex": ""})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/zip"
    z = zipfile.ZipFile(io.BytesIO(resp.content))
    assert sorted(z.namelist()) == ["home/", "home/alice/", "home/alice/Documents/",
                                    "home/alice/Documents/report.txt",
                                    "home/alice/notes.txt", "home/alice/shadow-link"]
    assert z.read("home/alice/Documents/report.txt") == b"alice's quarterly report\n"
    assert b"root:$6$secret" not in b"".join(z.read(n) for n in z.namelist())
    docs = c.get(f"/portal/snapshots/{world.sid}/download",
                 params={"path_hex": _hx(b"home/alice/Documents")})
    assert "home/alice/notes.txt" not in zipfile.ZipFile(io.BytesIO(docs.content)).namelist()


def test_a_portal_user_cannot_reach_anything_else_by_guessing_urls(world):
    c = world.client
    assert _sign_in(c) == 303
    base = f"/portal/snapshots/{world.sid}"
    refused = {
        # another endpoint's snapshot, though it has a home/alice too
        f"/portal/snapshots/{world.other_sid}": 404,
        f"/portal/snapshots/{world.other_sid[:8]}/download?path_hex="
        f"{_hx(b'home/alice/theirs.txt')}": 404,
        # outside her folder, in her own snapshot
        f"{base}?path_hex={_hx(b'etc')}": 403,
        f"{base}/download?path_hex={_hx(b'etc/passwd')}": 403,
        f"{base}/download?path_hex={_hx(b'home/bob/private.txt')}": 403,
        f"{base}/download?path_hex={_hx(b'home/alicex')}": 403,  # a prefix is not a folder
        f"{base}?path_hex={_hx(b'')}": 200,  # '' is her folder
        # climbing out, or odd encodings
        f"{base}/download?path_hex={_hx(b'home/alice/../../etc/passwd')}": 422,
        f"{base}/download?path_hex=zz": 422,
        # in her folder, but not hers to read: the hard link to a root-only file; and a
        # symlink is never followed
        f"{base}/download?path_hex={_hx(b'home/alice/shadow-copy')}": 404,
        f"{base}/download?path_hex={_hx(b'home/alice/shadow-link')}": 422,
        # hers, but behind a folder she could not open
        f"{base}?path_hex={_hx(b'home/alice/locked')}": 404,
        f"{base}?path_hex={_hx(b'home/alice/locked/sub')}": 404,
        f"{base}/download?path_hex={_hx(b'home/alice/locked/inside.txt')}": 404,
        f"{base}?q=inside": 200,
    }
    for url, status in refused.items():
        resp = c.get(url)
        assert resp.status_code == status, (url, resp.status_code, resp.text[-300:])
        assert b"root:$6$secret" not in resp.content and b"root:x:0" not in resp.content
        assert b"another endpoint" not in resp.content and b"inside.txt" not in resp.content
        assert b"deeper.txt" not in resp.content


def test_portal_and_console_sessions_do_not_open_each_other(world):
    c = world.client
    assert _sign_in(c) == 303
    assert c.get("/", follow_redirects=False).headers["location"] == "/login"
    assert c.get(f"{ADMIN}/endpoints").status_code == 401  # no bearer: the API is closed
    staff = TestClient(world.app)
    staff.post(f"{ADMIN}/users", headers=world.api,
               json={"name": "hana", "role": "help-desk", "password": PASSWORD})
    page = staff.get("/login").text
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    staff.post("/login", data={"name": "hana", "password": PASSWORD, "csrf": token})
    assert staff.get("/portal", follow_redirects=False).status_code == 303


def test_deleting_an_account_ends_its_sessions_and_the_help_desk_manages_them(world):
    c, api = world.client, world.api
    assert _sign_in(c) == 303
    resp = c.post(f"{ADMIN}/endpoints/{world.other}/portal-accounts", headers=api,
                  json={"name": "alice", "password": PASSWORD})
    assert resp.status_code == 409
    resp = c.post(f"{ADMIN}/endpoints/{world.other}/portal-accounts", headers=api,
                  json={"name": "carol", "password": PASSWORD, "home": "../etc"})
    assert resp.status_code == 422
    listed = c.get(f"{ADMIN}/portal-accounts", params={"endpoint": world.ep},
                   headers=api).json()
    assert [(a["name"], a["hostname"]) for a in listed] == [("alice", "laptop")]
    c.delete(f"{ADMIN}/portal-accounts/alice", headers=api).raise_for_status()
    assert c.get("/portal", follow_redirects=False).status_code == 303
    assert _sign_in(c) == 401


@pytest.mark.e2e
def test_portal_commands(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    server = Server(tmp_path / "data", signing=False).start()
    try:
        common = ("--server", server.url, "--admin-token-file", server.token_file)
        tok = server.create_token()

        eid = web.post(server.url + "/api/v1/agent/enroll", json={
            "token": tok, "hostname": "w1", "os": "windows"}).json()["endpoint_id"]
        out = strata("portal", "add", eid, "ann", "--password-file", pw, *common).stdout
        assert "folder Users/ann" in out
        assert "ann" in strata("portal", "list", *common).stdout
        assert_one_line_error(strata("portal", "add", eid, "Ann", "--password-file", pw,
                                     *common, rc=2), "not valid")
        assert_one_line_error(strata("portal", "delete", "ann", *common, rc=None),
                              "refusing without --yes", rc=NotConfirmed.exit_code)
        strata("portal", "delete", "ann", "--yes", *common)
        assert "ann" not in strata("portal", "list", *common).stdout
    finally:
        server.stop()
        server.kill()


def test_the_help_desk_gives_portal_access_from_the_endpoint_page(world):
    staff = TestClient(world.app)
    for name, role in (("hana", "help-desk"), ("ivan", "image-manager")):
        staff.post(f"{ADMIN}/users", headers=world.api,
                   json={"name": name, "role": role, "password": PASSWORD})
    page = staff.get("/login").text
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    staff.post("/login", data={"name": "hana", "password": PASSWORD, "csrf": token})
    page = staff.get(f"/endpoints/{world.other}").text
    assert "File portal" in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    resp = staff.post(f"/endpoints/{world.other}/portal-accounts",
                      data={"name": "zoe", "home": "home/alice", "password": PASSWORD,
                            "csrf": csrf})
    assert resp.status_code == 200 and "portal account zoe: folder home/alice" in resp.text
    resp = staff.post(f"/endpoints/{world.other}/portal-accounts",
                      data={"name": "zoe2", "password": "short", "csrf": csrf})
    assert resp.status_code == 422 and "at least 12" in resp.text
    user = TestClient(world.app)
    assert _sign_in(user, "zoe") == 303
    assert "theirs.txt" in user.get(f"/portal/snapshots/{world.other_sid}").text
    # alice's account belongs to the other endpoint: not deletable through this one
    resp = staff.post(f"/endpoints/{world.other}/portal-accounts/alice/delete",
                      data={"csrf": csrf})
    assert resp.status_code == 404
    resp = staff.post(f"/endpoints/{world.other}/portal-accounts/zoe/delete",
                      data={"csrf": csrf})
    assert "deleted portal account zoe" in resp.text
    assert user.get("/portal", follow_redirects=False).status_code == 303
    im = TestClient(world.app)
    page = im.get("/login").text
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    im.post("/login", data={"name": "ivan", "password": PASSWORD, "csrf": token})
    page = im.get(f"/endpoints/{world.ep}").text
    assert "File portal" not in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    assert im.post(f"/endpoints/{world.ep}/portal-accounts",
                   data={"name": "eve", "password": PASSWORD, "csrf": csrf}
                   ).status_code == 403


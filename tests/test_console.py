"""The web console at `/`: sign-in with sessions, CSRF on every form, a content security
policy, every endpoint-supplied string escaped, each role's pages and nothing else, the
dashboard and the endpoint search; then the same in a real browser (headless Chromium
driven by Playwright) against a real server with enrolled endpoints."""

from __future__ import annotations

import csv
import io
import os
import re
import threading
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the dev dependencies bring it; without them the browser tests skip
    expect = sync_playwright = None  # type: ignore[assignment]

from fastapi.routing import APIRoute

from server_fixtures import Agent, Server, device, enroll_request, write_documents
from strata.engine.backup import backup
from strata.model.entry import Entry, EntryType
from strata.model.roles import ROLES, Permission
from strata.server import passwords
from strata.server.app import create_app
from strata.server.catalog.models import (
    Assignment,
    Cvd,
    SnapshotRecord,
    Task,
    TaskMember,
    UserSession,
)
from strata.server.console.chart import storage_chart
from strata.server.console.pages import ROUTERS
from strata.server.console.portal import portal_visitor
from strata.server.console.portal import router as portal_router
from strata.server.console.render import HERE
from strata.server.console.session import Page
from strata.server.console.views import NAV
from strata.server.context import ServerSettings
from strata.server.services import fleet as fleet_service
from strata.server.services import snapshots
from strata.server.services.fleet import HistoryPoint
from strata.server.services.layers import save_layer

ADMIN = "/api/v1/admin"
PASSWORD = "correct horse battery"


XSS = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"
# The pages each role may open, by permission (the menu shows exactly these).
PAGES = {href: perm for href, _label, perm in NAV}
USERS = {"hana": "help-desk", "ivan": "image-manager", "paula": "protection-manager",
         "ada": "administrator"}


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def sign_in(client: TestClient, name: str, password: str = PASSWORD) -> httpx.Response:
    token = _csrf(client.get("/login").text)
    return client.post("/login", data={"name": name, "password": password, "csrf": token},
                       follow_redirects=False)


@pytest.fixture()
def console(tmp_path: Path) -> Iterator[SimpleNamespace]:
    app = create_app(ServerSettings(data_dir=tmp_path / "data"))
    admin_token = (tmp_path / "data/admin.token").read_text().strip()
    api = {"Authorization": f"Bearer {admin_token}"}
    with TestClient(app) as client:
        for name, role in USERS.items():
            resp = client.post(f"{ADMIN}/users", headers=api,
                               json={"name": name, "role": role, "password": PASSWORD})
            assert resp.status_code == 200, resp.text

        def enroll(hostname: str, **inventory: object) -> str:
            tok = client.post(f"{ADMIN}/tokens", headers=api, json={"uses": 1}).json()
            resp = client.post("/api/v1/agent/enroll", json={
                "token": tok["token"], "hostname": hostname, "os": "debian",
                "inventory": inventory})
            return resp.json()["endpoint_id"]

        yield SimpleNamespace(app=app, ctx=app.state.ctx, client=client, api=api,
                              enroll=enroll)


def test_the_console_is_served_at_the_root_and_asks_to_sign_in(console):
    c = console.client
    resp = c.get("/", follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/login"
    page = c.get("/login")
    assert page.status_code == 200 and 'name="password"' in page.text
    # Every asset is served by the server itself: nothing from the internet.
    js = c.get("/static/htmx.min.js")
    assert js.status_code == 200 and b'version:"2.0.11"' in js.content
    assert c.get("/static/console.css").status_code == 200
    for template in (HERE / "templates").glob("*.html"):
        text = template.read_text()
        assert not re.search(r"""(src|href|action)=["']?(https?:)?//""", text), template


def test_pages_carry_a_content_security_policy_and_no_inline_script(console):
    c = console.client
    assert sign_in(c, "ada").status_code == 303
    for href in [*PAGES, "/account", "/endpoints/no-such-endpoint"]:
        resp = c.get(href)
        assert resp.status_code == (404 if "no-such" in href else 200), href
        csp = resp.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert resp.headers["x-frame-options"] == "DENY"
        assert resp.headers["cache-control"] == "no-store"
        assert not re.search(r"<script(?![^>]*\bsrc=)", resp.text), href  # inline script
        assert not re.search(r"\s(on\w+|style)=", resp.text), href  # handlers, styles


OPEN_PAGES = {"/login", "/logout", "/portal/login"}  # before a session, or ending one


def _needs(dependant: object) -> set[str]:
    """The console permissions (Page) and portal sessions a route's dependencies ask."""
    found = set()
    for sub in dependant.dependencies:  # type: ignore[attr-defined]
        if isinstance(sub.call, Page):
            found.add(sub.call.permission.value)
        elif sub.call is portal_visitor:
            found.add("portal")
        found |= _needs(sub)
    return found


def test_every_console_page_needs_a_permission_or_a_portal_session():
    """Like the admin API's route walk: a console or portal page added without a
    permission (Page) or a portal session fails here."""
    pages = [r for router in [*ROUTERS, portal_router] for r in router.routes
             if isinstance(r, APIRoute)]
    assert len(pages) > 25
    for route in pages:
        needs = _needs(route.dependant)
        if route.path in OPEN_PAGES:
            continue
        assert needs, f"{sorted(route.methods)} {route.path} needs no permission"
        if route.path.startswith("/portal"):
            assert needs == {"portal"}, route.path
        else:
            assert "portal" not in needs and len(needs) == 1, (route.path, needs)


def test_a_wrong_password_is_refused_in_the_page_and_locks_after_five(console):
    c = console.client
    for _ in range(5):
        resp = sign_in(c, "hana", "not the password")
        assert resp.status_code == 401 and "unknown user name or wrong password" in resp.text
    resp = sign_in(c, "hana")
    assert resp.status_code == 429 and "too many failed sign-ins" in resp.text
    assert sign_in(c, "nobody").status_code == 401  # an unknown name reads the same


def test_password_hashes_take_turns_and_a_crowd_is_told_to_retry(console, monkeypatch):
    """Each hash takes 32 MiB: at most HASHES_AT_ONCE run together; a sign-in that cannot
    get a turn in time is a 429 page, not a queue of threads eating memory."""
    turns = threading.BoundedSemaphore(1)
    monkeypatch.setattr(passwords, "_turns", turns)
    monkeypatch.setattr(passwords, "HASH_WAIT", 0.01)
    c = console.client
    token = _csrf(c.get("/login").text)
    assert turns.acquire()  # someone else is hashing
    try:
        resp = c.post("/login", data={"name": "ada", "password": PASSWORD, "csrf": token})
        assert resp.status_code == 429 and "busy signing others in" in resp.text
    finally:
        turns.release()
    assert sign_in(c, "ada").status_code == 303


def test_the_session_cookie_is_httponly_strict_and_secure_over_tls(tmp_path):
    app = create_app(ServerSettings(data_dir=tmp_path / "data"))
    token = (tmp_path / "data/admin.token").read_text().strip()
    for base in ("http://testserver", "https://testserver"):
        with TestClient(app, base_url=base) as c:
            c.post(f"{ADMIN}/users", headers={"Authorization": f"Bearer {token}"},
                   json={"name": "ada", "role": "administrator", "password": PASSWORD})
            cookie = sign_in(c, "ada").headers["set-cookie"]
            assert "strata_session=" in cookie and "HttpOnly" in cookie
            assert "SameSite=strict" in cookie
            assert ("Secure" in cookie) == base.startswith("https")
            hsts = c.get("/login").headers.get("strict-transport-security")
            assert (hsts == "max-age=31536000") == base.startswith("https")


def test_every_form_needs_its_csrf_token_and_this_origin(console):
    c = console.client
    # The sign-in form: its token must match the cookie set with the form.
    c.get("/login")
    resp = c.post("/login", data={"name": "ada", "password": PASSWORD, "csrf": "forged"})
    assert resp.status_code == 403 and "Refused" in resp.text
    assert sign_in(c, "ada").status_code == 303
    token = _csrf(c.get("/users").text)
    new = {"name": "mallory", "role": "administrator", "password": PASSWORD}
    assert c.post("/users", data=new).status_code == 403  # no token
    assert c.post("/users", data={**new, "csrf": "x" * 43}).status_code == 403
    resp = c.post("/users", data={**new, "csrf": token},
                  headers={"Origin": "https://evil.example"})
    assert resp.status_code == 403 and "another site" in resp.text
    names = {u["name"] for u in c.get(f"{ADMIN}/users", headers=console.api).json()}
    assert "mallory" not in names
    assert c.post("/policies/retention", data={"daily": "1"}).status_code == 403
    assert c.post("/logout").status_code == 403
    # With the token (as a field, or as htmx's header) it goes through.
    resp = c.post("/users", data={**new, "csrf": token})
    assert resp.status_code == 200 and "created user mallory" in resp.text
    resp = c.post("/users/mallory/role", data={"role": "help-desk", "csrf": token})
    assert resp.status_code == 200 and "mallory is now help-desk" in resp.text
    assert c.post("/users/mallory/role", data={"role": "god", "csrf": token}
                  ).status_code == 422
    resp = c.post("/users/mallory/delete", headers={"X-CSRF-Token": token})
    assert resp.status_code == 200 and "deleted user mallory" in resp.text


def test_each_role_sees_and_opens_only_its_pages(console):
    for name, role in USERS.items():
        c = TestClient(console.app)
        assert sign_in(c, name).status_code == 303
        home = c.get("/").text
        menu = set(re.findall(r'<nav>(.*?)</nav>', home, re.S)[0].split('href="')[1:])
        shown = {m.split('"')[0] for m in menu}
        assert shown == {h for h, p in PAGES.items() if p in ROLES[role]}, role
        for href, perm in PAGES.items():
            resp = c.get(href)
            if perm in ROLES[role]:
                assert resp.status_code == 200, (role, href)
            else:
                assert resp.status_code == 403, (role, href)
                assert f"needs the '{perm.value}' permission" in resp.text.replace("&#39;", "'")


def test_an_ended_session_goes_back_to_the_sign_in_page(console):
    c = console.client
    assert sign_in(c, "hana").status_code == 303
    assert c.get("/endpoints").status_code == 200
    with console.ctx.write() as db:
        db.execute(update(UserSession).values(
            last_seen=datetime.now(UTC) - timedelta(hours=1)))
    resp = c.get("/endpoints", follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/login"
    assert sign_in(c, "hana").status_code == 303
    token = _csrf(c.get("/").text)
    c.post("/logout", data={"csrf": token})
    resp = c.get("/endpoints", headers={"HX-Request": "true"}, follow_redirects=False)
    assert resp.status_code == 401 and resp.headers["hx-redirect"] == "/login"


def test_endpoint_strings_are_escaped_everywhere(console):
    c = console.client
    eid = console.enroll(XSS, vendor=XSS, **{XSS: "key"})
    c.put(f"{ADMIN}/endpoints/{eid}/tags", headers=console.api, json={"tags": [XSS]})
    assert sign_in(c, "ada").status_code == 303
    for href in ("/", "/endpoints", f"/endpoints/{eid}", "/endpoints?q=%3Cscript",
                 "/audit"):
        html = c.get(href).text
        assert "<script>document" not in html and "<img src=x" not in html, href
    assert "&lt;script&gt;document.title=" in c.get(f"/endpoints/{eid}").text


def test_the_endpoint_page_title_is_its_hostname(console):
    """The page's <title> holds the hostname alone (it once held the portal form)."""
    c = console.client
    eid = console.enroll("lab-07")
    assert sign_in(c, "ada").status_code == 303
    html = c.get(f"/endpoints/{eid}").text
    title = html[html.index("<title>") + 7:html.index("</title>")]
    assert title == "lab-07 · Strata", title
    assert html.count("<h2>File portal</h2>") == 1


def test_the_endpoint_search_matches_text_not_patterns_and_filters(console):
    c = console.client
    ids = {host: console.enroll(host) for host in ("lab-01", "lab-02", "finance-pc",
                                                    "50%_off")}
    c.put(f"{ADMIN}/endpoints/{ids['lab-01']}/tags", headers=console.api,
          json={"tags": ["kiosk", "floor-2"]}).raise_for_status()
    c.put(f"{ADMIN}/endpoints/{ids['finance-pc']}/tags", headers=console.api,
          json={"tags": ["kiosk-old"]}).raise_for_status()
    c.post(f"{ADMIN}/collections", headers=console.api, json={
        "name": "finance", "members": [ids["finance-pc"], ids["50%_off"]]}).raise_for_status()
    c.post(f"{ADMIN}/endpoints/{ids['lab-02']}/revoke", headers=console.api).raise_for_status()
    assert sign_in(c, "hana").status_code == 303

    def hosts(query: str = "", **filters: str) -> list[str]:
        rows = c.get("/endpoints", params={"q": query, **filters},
                     headers={"HX-Request": "true"}).text
        return sorted(re.findall(r'<a href="/endpoints/[^"]+">([^<]+)</a>', rows))

    assert hosts("lab") == ["lab-01", "lab-02"]
    assert hosts("LAB-0") == ["lab-01", "lab-02"]
    assert hosts("%") == ["50%_off"] and hosts("_") == ["50%_off"]
    assert len(hosts("")) == 4
    assert hosts("nothing-like-it") == []
    assert hosts(state="revoked") == ["lab-02"]
    assert hosts("lab", state="active") == ["lab-01"]
    assert hosts(tag="kiosk") == ["lab-01"]  # a whole tag, not a part of one
    assert hosts(tag="kiosk%") == [] and hosts(tag='"') == []
    assert hosts(collection="finance") == ["50%_off", "finance-pc"]
    assert hosts(os="debian") == sorted(ids) and hosts(os="windows") == []
    assert "no collection" in c.get("/endpoints", params={"collection": "nope"}).text
    page = c.get("/endpoints").text
    assert '<option value="finance">' in page and '<option value="debian">' in page


def test_the_endpoint_filters_read_alike_on_both_catalog_databases(catalogs, tmp_path):
    app = create_app(ServerSettings(data_dir=tmp_path / "data",
                                    catalog_url=catalogs.url(tmp_path)))
    api = {"Authorization": "Bearer " + (tmp_path / "data/admin.token").read_text().strip()}
    with TestClient(app) as c:
        ids = []
        for host, tags in (("a_1", ["kiosk", "x"]), ("b%2", ["kiosk-old"]), ("c", [])):
            tok = c.post(f"{ADMIN}/tokens", headers=api, json={"uses": 1}).json()["token"]
            eid = c.post("/api/v1/agent/enroll", json={"token": tok, "hostname": host,
                                                       "os": "debian"}).json()["endpoint_id"]
            c.put(f"{ADMIN}/endpoints/{eid}/tags", headers=api, json={"tags": tags})
            ids.append(eid)
        ctx = app.state.ctx

        def hosts(**f: str) -> list[str]:
            found = fleet_service.search_endpoints(ctx, fleet_service.EndpointFilter(**f))
            return sorted(r.hostname for r in found)

        assert hosts(tag="kiosk") == ["a_1"] and hosts(tag="kiosk-old") == ["b%2"]
        assert hosts(text="_") == ["a_1"] and hosts(text="%") == ["b%2"]
        assert hosts(text="A_") == ["a_1"] and hosts(os="debian") == ["a_1", "b%2", "c"]
        everyone = fleet_service.search_endpoints(ctx, fleet_service.EndpointFilter())
        assert [r.snapshots for r in everyone] == [0, 0, 0]
        assert fleet_service.storage_history(ctx) == []
        # Snapshot records on three days (one just before midnight UTC): the storage
        # history adds them up day by day, in UTC whatever the database's time zone.
        with ctx.write() as db:
            cvds = {c.endpoint_id: c.id for c in db.scalars(select(Cvd))}
            day = datetime(2026, 3, 1, 23, 59, tzinfo=UTC)
            for n, (eid, when, total, new) in enumerate((
                    (ids[0], day, 100, 100), (ids[1], day, 100, 10),
                    (ids[0], day + timedelta(days=1), 110, 5),
                    (ids[2], day + timedelta(days=3), 50, 50))):
                db.add(SnapshotRecord(id=f"{n:064x}", cvd_id=cvds[eid], time=when,
                                      bytes_total=total, bytes_new=new))
        history = fleet_service.storage_history(ctx)
        assert [(p.day, p.logical_bytes, p.new_bytes) for p in history] == [
            ("2026-03-01", 200, 110), ("2026-03-02", 310, 115), ("2026-03-04", 360, 165)]
        overview = fleet_service.overview(ctx)
        assert overview.by_state == {"active": 3} and overview.history == history
        counts = {r.hostname: r.snapshots for r in fleet_service.search_endpoints(
            ctx, fleet_service.EndpointFilter())}
        assert counts == {"a_1": 2, "b%2": 1, "c": 1}


def test_the_storage_chart_is_drawn_on_the_server():
    assert storage_chart([]) is None
    one = storage_chart([HistoryPoint("2026-03-01", 200, 100)])
    assert one is not None and one.logical == "4.0,4.0 596.0,4.0" and one.ratio == "2.0×"
    three = storage_chart([HistoryPoint("d1", 100, 100), HistoryPoint("d2", 200, 100),
                           HistoryPoint("d3", 400, 100)])
    assert three is not None and three.top == "400 B" and three.first_day == "d1"
    xs = [float(p.split(",")[0]) for p in three.logical.split()]
    ys = [float(p.split(",")[1]) for p in three.logical.split()]
    assert xs == [4.0, 300.0, 596.0] and ys[0] > ys[1] > ys[2] == 4.0


def test_tables_export_as_csv_with_formulas_kept_as_text(console):
    c = console.client
    console.enroll("=HYPERLINK(\"http://evil\",\"x\")")
    console.enroll("lab-01")
    assert sign_in(c, "ada").status_code == 303
    resp = c.get("/endpoints", params={"q": "", "format": "csv"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/csv")
    assert "attachment" in resp.headers["content-disposition"]
    rows = list(csv.reader(io.StringIO(resp.text)))
    assert rows[0][:3] == ["id", "hostname", "state"] and len(rows) == 3
    hosts = sorted(r[1] for r in rows[1:])
    assert hosts == ["'=HYPERLINK(\"http://evil\",\"x\")", "lab-01"]
    only_lab = list(csv.reader(io.StringIO(c.get("/endpoints", params={
        "q": "lab", "format": "csv"}).text)))
    assert [r[1] for r in only_lab[1:]] == ["lab-01"]
    log = list(csv.reader(io.StringIO(c.get("/audit", params={
        "who": "user:ada", "format": "csv"}).text)))
    assert log[0] == ["time", "actor", "action", "target", "detail"]
    assert {r[1] for r in log[1:]} == {"user:ada"} and "login" in {r[2] for r in log[1:]}
    page = c.get("/audit", params={"who": "endpoint:"}).text
    assert "user:ada" not in page and "enroll" in page
    assert 'data-testid="audit-row"' not in c.get("/audit", params={"who": "%"}).text


def test_the_dashboard_counts_endpoints_by_state(console):
    c = console.client
    for host in ("a", "b", "c"):
        console.enroll(host)
    eid = console.enroll("d")
    c.post(f"{ADMIN}/endpoints/{eid}/revoke", headers=console.api).raise_for_status()
    assert sign_in(c, "paula").status_code == 303
    html = c.get("/").text
    assert re.search(r'data-testid="endpoint-total">4<', html)
    assert re.search(r'data-testid="state-active">3<', html)
    assert re.search(r'data-testid="state-revoked">1<', html)


def test_console_changes_are_audited_under_the_user(console):
    c = console.client
    assert sign_in(c, "paula").status_code == 303
    token = _csrf(c.get("/policies").text)
    resp = c.post("/policies/retention", data={"daily": "9", "monthly": "", "csrf": token})
    assert resp.status_code == 200 and "Retention policy saved" in resp.text
    resp = c.post("/policies/retention", data={"daily": "nine", "csrf": token})
    assert resp.status_code == 422 and "a whole number is needed" in resp.text
    doc = c.get(f"{ADMIN}/policies/retention", headers=console.api).json()
    assert doc == {"daily": 9}
    log = c.get(f"{ADMIN}/audit", headers=console.api).json()
    assert {"actor": "user:paula", "action": "set-policy"}.items() <= log[0].items()
    assert any(e["actor"] == "user:paula" and e["action"] == "login" for e in log)


def test_a_policy_form_refuses_to_save_over_another_admins_change(console):
    """Each policy form carries the revision it shows: saving after someone else changed
    that policy is refused with the reason, and their change stands."""
    c = console.client
    assert sign_in(c, "paula").status_code == 303
    html = c.get("/policies").text
    token = _csrf(html)
    shown = re.search(r'action="/policies/retention".*?name="revision" value="(\w+)"', html,
                      re.S)
    assert shown, html
    c.put(f"{ADMIN}/policies/retention", headers=console.api,
          json={"hourly": 24, "daily": 60, "monthly": 12}).raise_for_status()
    resp = c.post("/policies/retention", data={"daily": "9", "csrf": token,
                                               "revision": shown.group(1)})
    assert resp.status_code == 409 and f"changed since revision {shown.group(1)}" in resp.text
    assert c.get(f"{ADMIN}/policies/retention", headers=console.api).json()["daily"] == 60
    token = _csrf(resp.text)  # the page shown again carries the new revision: it saves
    fresh = re.search(r'action="/policies/retention".*?name="revision" value="(\w+)"',
                      resp.text, re.S)
    assert fresh and fresh.group(1) != shown.group(1)
    resp = c.post("/policies/retention", data={"daily": "9", "csrf": token,
                                               "revision": fresh.group(1)})
    assert resp.status_code == 200 and "Retention policy saved" in resp.text


def test_upload_and_bandwidth_policies_are_forms_with_validation(console):
    c = console.client
    assert sign_in(c, "paula").status_code == 303
    token = _csrf(c.get("/policies").text)
    resp = c.post("/policies/upload", data={
        "interval_seconds": "900", "exclude_linux": "/tmp/\n\n/var/cache/\n",
        "exclude_windows": "/pagefile.sys", "csrf": token})
    assert resp.status_code == 200 and "Upload policy saved" in resp.text
    doc = c.get(f"{ADMIN}/policies/upload", headers=console.api).json()
    assert doc == {"interval_seconds": 900, "exclusions": {
        "linux": ["/tmp/", "/var/cache/"], "windows": ["/pagefile.sys"]}}
    for bad, why in (("30", "at least 60"), ("soon", "whole number")):
        resp = c.post("/policies/upload", data={"interval_seconds": bad, "csrf": token})
        assert resp.status_code == 422 and why in resp.text, bad
    resp = c.post("/policies/bandwidth", data={"subnet": "10.1.0.0/16", "start": "08:00",
                                               "end": "18:00", "upload_kbps": "512",
                                               "csrf": token})
    assert resp.status_code == 200 and resp.text.count('data-testid="bandwidth-rule"') == 1
    c.post("/policies/bandwidth", data={"site": "paris", "download_kbps": "2048",
                                        "csrf": token})
    rules = c.get(f"{ADMIN}/policies/bandwidth", headers=console.api).json()["rules"]
    assert rules == [{"subnet": "10.1.0.0/16", "start": "08:00", "end": "18:00",
                      "upload_kbps": 512}, {"site": "paris", "download_kbps": 2048}]
    for bad in ({"subnet": "10.1.0.0/99"}, {"start": "8 o'clock"}, {"upload_kbps": "-5"},
                {}):
        resp = c.post("/policies/bandwidth", data={**bad, "csrf": token})
        assert resp.status_code == 422, bad
    c.post("/policies/bandwidth", data={"remove": "1", "csrf": token})
    rules = c.get(f"{ADMIN}/policies/bandwidth", headers=console.api).json()["rules"]
    assert rules == [{"site": "paris", "download_kbps": 2048}]
    assert c.post("/policies/bandwidth", data={"remove": "9", "csrf": token}
                  ).status_code == 422
    assert c.post("/policies/upload", data={"interval_seconds": "900"}).status_code == 403


def test_a_protection_manager_runs_retention_and_prune_and_a_help_desk_cannot(console):
    c = console.client
    assert sign_in(c, "hana").status_code == 303
    token = _csrf(c.get("/").text)
    assert c.post("/maintenance", data={"csrf": token}).status_code == 403
    c = TestClient(console.app)
    assert sign_in(c, "paula").status_code == 303
    page = c.get("/policies").text
    assert "Run retention and prune now" in page
    resp = c.post("/maintenance", data={"csrf": _csrf(page)})
    assert resp.status_code == 200 and "removed by retention; prune freed" in resp.text
    log = c.get(f"{ADMIN}/audit", headers=console.api).json()
    assert {"actor": "user:paula", "action": "maintenance"}.items() <= log[0].items()


def _task(ctx, endpoints: dict[str, tuple[str, float]], hostile: bool = True) -> int:
    """A migration task over these endpoints, each at (state, percent): catalog rows, as
    `strata migrate` and the agents' reports leave them."""
    with ctx.write() as db:
        task = Task(kind="migrate", params={"collection": "lab", "base": "corp-os:2"},
                    endpoints=list(endpoints))
        db.add(task)
        db.flush()
        for eid, (state, percent) in endpoints.items():
            db.merge(Assignment(endpoint_id=eid, task_id=task.id, state=state,
                                percent=percent,
                                detail=f"<i>{state}</i>" if hostile else ""))
            db.add(TaskMember(task_id=task.id, endpoint_id=eid,
                              previous={"task_id": None, "app_ids": []},
                              target={"app_ids": []}))
        return task.id


def test_tasks_show_each_endpoints_progress_and_poll_while_running(console):
    c = console.client
    a, b = console.enroll("lab-01"), console.enroll("lab-02")
    tid = _task(console.ctx, {a: ("applied", 100.0), b: ("downloading", 40.0)})
    assert sign_in(c, "hana").status_code == 303
    listing = c.get("/tasks").text
    assert f'<a href="/tasks/{tid}">{tid}</a>' in listing and "50%" in listing
    page = c.get(f"/tasks/{tid}").text
    assert 'data-testid="task-state">running<' in page and 'hx-trigger="every 2s"' in page
    assert "&lt;i&gt;downloading&lt;/i&gt;" in page and "corp-os:2" in page
    with console.ctx.write() as db:
        db.execute(update(Assignment).where(Assignment.endpoint_id == b)
                   .values(state="applied", percent=100.0))
    part = c.get(f"/tasks/{tid}", headers={"HX-Request": "true"}).text
    assert part.startswith('<section id="task-progress" data-state="done"')
    assert "hx-trigger" not in part  # done: the page stops asking
    assert c.get("/tasks/9999").status_code == 404


def test_the_tasks_page_cancels_and_retries_for_the_roles_that_may(console):
    """Cancel and retry are forms with the CSRF token, shown and allowed only to a role
    that may start the task's kind (a migration: image managers, not the help desk)."""
    c = console.client
    a, b = console.enroll("lab-01"), console.enroll("lab-02")
    tid = _task(console.ctx, {a: ("assigned", 0.0), b: ("failed", 10.0)}, hostile=False)
    assert sign_in(c, "hana").status_code == 303
    page = c.get(f"/tasks/{tid}").text
    assert "task-cancel" not in page and "task-retry" not in page
    token = _csrf(c.get("/account").text)
    resp = c.post(f"/tasks/{tid}/cancel", data={"csrf": token})
    assert resp.status_code == 403 and "needs the &#39;migrate&#39; permission" in resp.text
    c.post("/logout", data={"csrf": token})
    assert sign_in(c, "ivan").status_code == 303
    listing = c.get("/tasks").text
    assert f'action="/tasks/{tid}/cancel"' in listing and f'action="/tasks/{tid}/retry"' in listing
    assert c.post(f"/tasks/{tid}/cancel", data={"csrf": "forged"}).status_code == 403
    token = _csrf(c.get(f"/tasks/{tid}").text)
    resp = c.post(f"/tasks/{tid}/cancel", data={"csrf": token}, follow_redirects=False)
    assert resp.status_code == 303  # a reload of the page that follows sends nothing
    page = c.get(resp.headers["location"]).text
    assert "cancelled: 1 endpoint(s) not started are skipped" in page
    assert "task-cancel" not in page
    page = c.post(f"/tasks/{tid}/retry", data={"csrf": token}).text
    assert "queued again: 2 endpoint(s)" in page
    with console.ctx.session() as db:
        assert {db.get(Assignment, e).state for e in (a, b)} == {"assigned"}
    rows = list(csv.reader(io.StringIO(c.get(f"/tasks/{tid}?format=csv").text)))
    assert rows[0][:3] == ["endpoint", "hostname", "state"]
    assert sorted((r[1], r[2], r[4]) for r in rows[1:]) == [("lab-01", "assigned", "2"),
                                                            ("lab-02", "assigned", "2")]
    log = c.get(f"{ADMIN}/audit", headers=console.api).json()
    assert [e["action"] for e in log if e["actor"] == "user:ivan"][:2] == \
        ["retry-task", "cancel-task"]


def test_the_compliance_page_lists_endpoints_it_cannot_measure_yet(console):
    console.enroll(XSS)
    c = console.client
    assert sign_in(c, "ivan").status_code == 303
    page = c.get("/compliance")
    assert page.status_code == 200 and page.text.count('data-testid="compliance-row"') == 1
    assert "&lt;script&gt;" in page.text and "<script>document" not in page.text


def _centralize(ctx, endpoint_id: str, src: Path) -> str:
    """A snapshot of `src` in the server's store, recorded as the endpoint's."""
    sid = backup(ctx.store, src).snapshot
    with ctx.write() as db:
        cvd = snapshots.cvd_of(db, endpoint_id)
        db.add(SnapshotRecord(id=sid, cvd_id=cvd.id, time=datetime.now(UTC)))
        cvd.last_snapshot = sid
    return sid


def test_the_help_desk_browses_a_snapshot_and_downloads_a_users_file(console, tmp_path):
    src = tmp_path / "laptop"
    (src / "home/alice/Documents").mkdir(parents=True)
    (src / "home/alice/Documents/report.txt").write_bytes(b"the quarterly report\n")
    odd = os.fsdecode(b"caf\xe9")  # a name that is not UTF-8
    (src / "home/alice" / odd).write_bytes(b"latin-1 name")
    (src / "home/alice/<script>x.txt").write_bytes(b"")
    eid = console.enroll("laptop-7")
    sid = _centralize(console.ctx, eid, src)
    other = _centralize(console.ctx, console.enroll("elsewhere"), src)
    c = console.client
    assert sign_in(c, "hana").status_code == 303
    assert f"/endpoints/{eid}/snapshots/{sid}/files" in c.get(f"/endpoints/{eid}").text
    base = f"/endpoints/{eid}/snapshots/{sid}"
    page = c.get(base + "/files", params={"path_hex": b"home/alice".hex()}).text
    assert "Documents/" in page and "caf\ufffd" in page and "&lt;script&gt;x.txt" in page
    doc = c.get(base + "/download",
                params={"path_hex": b"home/alice/Documents/report.txt".hex()})
    assert doc.status_code == 200 and doc.content == b"the quarterly report\n"
    assert "report.txt" in doc.headers["content-disposition"]
    assert c.get(base + "/download", params={"path_hex": (b"home/alice/caf\xe9").hex()}
                 ).content == b"latin-1 name"
    folder = c.get(base + "/download", params={"path_hex": b"home".hex(), "format": "zip"})
    names = zipfile.ZipFile(io.BytesIO(folder.content)).namelist()
    assert "home/alice/Documents/report.txt" in names
    log = c.get(f"{ADMIN}/audit", headers=console.api).json()
    assert {"actor": "user:hana", "action": "snapshot-download"}.items() <= log[0].items()
    # Another endpoint's snapshot through this endpoint's URL, and paths out of the tree.
    assert c.get(f"/endpoints/{eid}/snapshots/{other}/files").status_code == 404
    for bad in (b"../etc".hex(), "zz", b"home/../..".hex()):
        assert c.get(base + "/files", params={"path_hex": bad}).status_code in (404, 422)
    # An image manager may browse, not download.
    im = TestClient(console.app)
    assert sign_in(im, "ivan").status_code == 303
    assert "Download" not in im.get(base + "/files").text
    resp = im.get(base + "/download", params={"path_hex": b"home".hex()})
    assert resp.status_code == 403


def test_an_image_manager_reads_compares_and_deletes_layers(console):
    ctx = console.ctx
    with ctx.write() as db:
        ids = [save_layer(ctx, db, kind="base", name="corp-os", version=v, family="linux",
                          entries=[Entry(path=b"usr", type=EntryType.DIR, mode=0o755),
                                   Entry(path=f"usr/v{v}".encode(), type=EntryType.DIR)]).id
               for v in ("1", "2")]
    eid = console.enroll("pc")
    with ctx.write() as db:  # a snapshot taken with corp-os:1 applied: revert needs it
        cvd = snapshots.cvd_of(db, eid)
        db.add(SnapshotRecord(id="ab" * 32, cvd_id=cvd.id, time=datetime.now(UTC),
                              layers=[ids[0]]))
    c = console.client
    assert sign_in(c, "ivan").status_code == 303
    listing = c.get("/layers").text
    assert listing.count('data-testid="layer-row"') == 2
    page = c.get(f"/layers/{ids[0]}").text
    assert "base layer corp-os:1" in page and f"/layers/{ids[0]}/diff/{ids[1]}" in page
    diff = c.get(f"/layers/{ids[0]}/diff/{ids[1]}").text
    assert "corp-os:1 → corp-os:2" in diff and "<code>usr/v2</code>" in diff
    assert "<code>usr/v1</code>" in diff  # removed
    token = _csrf(page)
    resp = c.post(f"/layers/{ids[0]}/delete", data={"csrf": token})
    assert resp.status_code == 409 and "referenced by 1 snapshot" in resp.text
    resp = c.post(f"/layers/{ids[1]}/delete", data={"csrf": token}, follow_redirects=False)
    assert resp.status_code == 303
    assert "deleted layer corp-os:2" in c.get(resp.headers["location"]).text
    assert c.get(f"/layers/{ids[1]}").status_code == 404
    assert c.post(f"/layers/{ids[0]}/delete").status_code == 403  # no CSRF token
    log = c.get(f"{ADMIN}/audit", headers=console.api).json()
    assert any(e["actor"] == "user:ivan" and e["action"] == "delete-layer" for e in log)
    hd = TestClient(console.app)
    assert sign_in(hd, "hana").status_code == 303
    assert hd.get(f"/layers/{ids[0]}").status_code == 403


def test_an_image_manager_defines_collections_by_rule_and_members(console):
    a, b = console.enroll("lab-01"), console.enroll("lab-02")
    console.enroll("office-pc")
    c = console.client
    assert sign_in(c, "ivan").status_code == 303
    token = _csrf(c.get("/collections").text)
    resp = c.post("/collections", data={"name": "labs", "hostname": "lab-*", "csrf": token})
    assert resp.status_code == 200 and "saved collection labs: 2 endpoint(s) now" in resp.text
    resp = c.post("/collections", data={"name": "pair", "members": f"{a[:8]}, {b}",
                                        "csrf": token})
    assert "saved collection pair: 2 endpoint(s)" in resp.text
    assert c.post("/collections", data={"name": "bad name!", "os": "x", "csrf": token}
                  ).status_code == 422
    resp = c.post("/collections", data={"name": "empty", "csrf": token})
    assert resp.status_code == 422 and "needs a rule or member" in resp.text
    resp = c.post("/collections", data={"name": "ghost", "members": "ffffffff",
                                        "csrf": token})
    assert resp.status_code == 404 and "no endpoint" in resp.text
    assert c.post("/collections", data={"name": "x", "os": "y"}).status_code == 403  # CSRF
    rows = c.get("/endpoints", params={"collection": "labs"},
                 headers={"HX-Request": "true"}).text
    assert rows.count('data-testid="endpoint-row"') == 2
    resp = c.post("/collections/pair/delete", data={"csrf": token})
    assert "deleted collection pair" in resp.text
    names = [x["name"] for x in c.get(f"{ADMIN}/collections", headers=console.api).json()]
    assert names == ["labs"]
    hd = TestClient(console.app)
    assert sign_in(hd, "paula").status_code == 303
    assert hd.get("/collections").status_code == 403


def test_an_administrator_hands_out_and_revokes_api_tokens_in_the_console(console):
    c = console.client
    assert sign_in(c, "ada").status_code == 303
    page = c.get("/users/hana")
    assert page.status_code == 200 and "None." in page.text
    resp = c.post("/users/hana/tokens",
                  data={"label": "<b>laptop</b>", "csrf": _csrf(page.text)})
    token = re.search(r'data-testid="new-token">([^<]+)<', resp.text)
    assert token and "&lt;b&gt;laptop&lt;/b&gt;" in resp.text
    api = {"Authorization": f"Bearer {token.group(1)}"}
    assert c.get(f"{ADMIN}/endpoints", headers=api).status_code == 200
    assert "susr_" not in c.get("/users/hana").text  # shown once, never again
    tid = c.get(f"{ADMIN}/users/hana/tokens", headers=console.api).json()[0]["id"]
    resp = c.post(f"/users/hana/tokens/{tid}/revoke", data={"csrf": _csrf(page.text)})
    assert resp.status_code == 200 and ">revoked<" in resp.text
    assert c.get(f"{ADMIN}/endpoints", headers=api).status_code == 403
    assert c.get("/users/nobody").status_code == 404
    other = TestClient(console.app)
    assert sign_in(other, "hana").status_code == 303
    assert other.get("/users/hana").status_code == 403
    assert other.post("/users/hana/tokens", data={"csrf": _csrf(other.get("/").text)}
                      ).status_code == 403


def test_users_change_their_own_password_with_the_current_one(console):
    c = console.client
    assert sign_in(c, "ivan").status_code == 303
    token = _csrf(c.get("/account").text)
    new = PASSWORD + " v2"
    resp = c.post("/account/password", data={"current": "wrong", "new": new, "again": new,
                                              "csrf": token})
    assert resp.status_code == 401 and "current password is wrong" in resp.text
    resp = c.post("/account/password", data={"current": PASSWORD, "new": new,
                                              "again": new + "x", "csrf": token})
    assert resp.status_code == 422 and "differ" in resp.text
    resp = c.post("/account/password", data={"current": PASSWORD, "new": "short",
                                              "again": "short", "csrf": token})
    assert resp.status_code == 422 and "at least 12" in resp.text
    resp = c.post("/account/password", data={"current": PASSWORD, "new": new, "again": new,
                                              "csrf": token}, follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/login"
    assert c.get("/", follow_redirects=False).status_code == 303  # signed out
    assert sign_in(c, "ivan").status_code == 401
    assert sign_in(c, "ivan", new).status_code == 303
    log = c.get(f"{ADMIN}/audit", headers=console.api).json()
    assert any(e["actor"] == "user:ivan" and e["action"] == "set-password" for e in log)
    assert any(e["action"] == "change-password-refused" for e in log)


# -- in a real browser -------------------------------------------------------------------------

# Debian's chromium-headless-shell: the same Chromium, without the desktop browser's
# windowing, what Playwright itself runs headless. The full browser (`chromium`) works
# too, at 2.7 times the CPU (43 CPU s instead of 16 for these tests).
CHROMIUM = next((p for p in map(Path, ("/usr/bin/chromium-headless-shell", "/usr/bin/chromium"))
                 if p.exists()), Path("/usr/bin/chromium-headless-shell"))
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--no-first-run"]
SCREENSHOTS = os.environ.get("STRATA_SCREENSHOTS", "")  # e.g. docs/screenshots


def _browser_or_skip() -> None:
    if CHROMIUM.exists() and sync_playwright is not None:
        return
    if os.environ.get("STRATA_REQUIRE_BROWSER"):
        pytest.fail(f"{CHROMIUM} is missing and STRATA_REQUIRE_BROWSER is set "
                    "(apt-get install chromium-headless-shell)")
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium-headless-shell)")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    _browser_or_skip()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A real server with users of each role and enrolled endpoints: one real agent that
    centralized a tree (so storage figures are real), and API enrollments, one of them
    with a hostile hostname, one waiting for approval."""
    _browser_or_skip()
    base = tmp_path_factory.mktemp("console")
    server = Server(base / "data", signing=False).start()
    try:
        tokens = {}
        for name, role in USERS.items():
            server.admin("POST", "/users", {"name": name, "role": role, "password": PASSWORD})
            tokens[name] = server.admin("POST", f"/users/{name}/tokens", {})["token"]
        root = base / "laptop"
        write_documents(root / "home/alice", seed=3, count=20, size=64 << 10)
        (root / "var/lib/dpkg").mkdir(parents=True)
        (root / "var/lib/dpkg/status").write_text(
            "Package: openssl\nStatus: install ok installed\nArchitecture: amd64\n"
            "Version: 3.0.15-1~deb12u1\n\nPackage: bash\nStatus: install ok installed\n"
            "Architecture: amd64\nVersion: 5.2.15-2+b7\n")
        agent = Agent(server, root, base / "agent-state")
        agent.enroll(server.create_token())
        agent.backup()
        for host in ("lab-01", "lab-02", XSS):
            resp = enroll_request(server, server.create_token(), host)
            assert resp.status_code == 200, resp.text
            device(server, resp.json()["credential"]).close()
        resp = enroll_request(server, server.create_token(require_approval=True), "newcomer")
        assert resp.status_code == 200
        yield SimpleNamespace(server=server, tokens=tokens, agent=agent, root=root)
    finally:
        server.stop()
        server.kill()


def _shot(page: object, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"),  # type: ignore[attr-defined]
                        full_page=True)


def _signed_in(browser: object, fleet: SimpleNamespace, name: str) -> tuple[object, object]:
    context = browser.new_context(viewport={"width": 1200, "height": 800})  # type: ignore[attr-defined]
    page = context.new_page()
    problems: list[str] = []
    # Script errors and CSP violations (a refused page's 403 is expected, not a problem).
    page.on("console", lambda m: problems.append(m.text) if m.type == "error"
            and not m.text.startswith("Failed to load resource") else None)
    page.on("dialog", lambda d: problems.append(f"dialog: {d.message}"))
    page.problems = problems
    page.goto(fleet.server.url + "/")
    assert page.url.endswith("/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(fleet.server.url + "/")
    assert page.text_content("[data-testid=who]").strip() == f"{name} · {USERS[name]}"
    return context, page


def _refused_elsewhere(page: object, fleet: SimpleNamespace, name: str) -> None:
    """In the page: the menu lists only the role's pages, and the others answer 403. At
    the API: the user's personal token is refused the routes of those permissions."""
    url, role = fleet.server.url, USERS[name]
    menu = {a.get_attribute("href") for a in page.query_selector_all("header nav a")}
    assert menu == {h for h, p in PAGES.items() if p in ROLES[role]}, (name, menu)
    for href, perm in PAGES.items():
        if perm in ROLES[role]:
            continue
        resp = page.goto(url + href)
        assert resp.status == 403, (name, href)
        assert "does not allow this page" in page.text_content("main")
    api = {"Authorization": f"Bearer {fleet.tokens[name]}"}
    checks = {Permission.USERS: ("GET", "/users"), Permission.LAYERS: ("GET", "/layers"),
              Permission.PROTECTION: ("GET", "/policies/retention"),
              Permission.AUDIT: ("GET", "/audit"), Permission.VIEW: ("GET", "/endpoints")}
    for perm, (method, path) in checks.items():
        resp = page.request.fetch(url + ADMIN + path, method=method, headers=api)
        assert (resp.status == 403) == (perm not in ROLES[role]), (name, path, resp.status)


@pytest.mark.e2e
def test_browser_help_desk_finds_a_machine_and_is_refused_the_rest(browser, fleet):
    context, page = _signed_in(browser, fleet, "hana")
    try:
        _shot(page, "dashboard")
        page.click("header nav a[href='/endpoints']")
        expect(page.locator("[data-testid=endpoint-row]")).to_have_count(5)
        # htmx narrows the list as the name is typed (under the CSP: no inline script).
        page.fill("input[name=q]", "lab-0")
        # (expect polls from outside: a wait_for_function string would be an eval, which
        # the CSP forbids.)
        expect(page.locator("[data-testid=endpoint-row]")).to_have_count(2)
        _shot(page, "endpoints")
        page.fill("input[name=q]", "")
        page.select_option("select[name=state]", "pending")
        expect(page.locator("[data-testid=endpoint-row]")).to_have_count(1)
        assert "newcomer" in page.text_content("#endpoint-rows")
        page.select_option("select[name=state]", "")
        expect(page.locator("[data-testid=endpoint-row]")).to_have_count(5)
        page.click("text=lab-01")
        expect(page.locator("[data-testid=hostname]")).to_have_text("lab-01")
        page.goto(fleet.server.url + f"/endpoints/{fleet.agent.endpoint_id}")
        assert page.locator("main table").nth(1).locator("tbody tr").count() >= 1
        _shot(page, "endpoint")
        # A user lost a document: the help desk finds it in the last snapshot and
        # downloads it for them.
        page.click("[data-testid=snapshot-row] a")
        page.click("text=home/")
        page.click("text=alice/")
        expect(page.locator("[data-testid=file-row]")).to_have_count(20)
        _shot(page, "snapshot")
        with page.expect_download() as got:
            page.locator("[data-testid=file-row]", has_text="doc-007.txt").locator(
                "text=Download").click()
        saved = got.value.path()
        assert got.value.suggested_filename == "doc-007.txt"
        assert Path(saved).read_bytes() == (fleet.root / "home/alice/doc-007.txt").read_bytes()
        _refused_elsewhere(page, fleet, "hana")
        assert page.problems == []
    finally:
        context.close()


@pytest.mark.e2e
def test_browser_image_manager_sees_layers_only(browser, fleet):
    context, page = _signed_in(browser, fleet, "ivan")
    try:
        page.click("header nav a[href='/layers']")
        expect(page.locator("main")).to_contain_text("No layer captured yet")
        _refused_elsewhere(page, fleet, "ivan")
        assert page.problems == []
    finally:
        context.close()


@pytest.mark.e2e
def test_browser_protection_manager_sets_retention(browser, fleet):
    context, page = _signed_in(browser, fleet, "paula")
    try:
        page.click("header nav a[href='/policies']")
        expect(page.locator("h1")).to_have_text("Policies")
        page.fill("input[name=daily]", "14")
        page.click("text=Save retention")
        expect(page.locator("main")).to_contain_text("Retention policy saved")
        _shot(page, "policies")
        assert fleet.server.admin("GET", "/policies/retention")["daily"] == 14
        page.click("text=Run retention and prune now")
        expect(page.locator("[data-testid=pruned]")).to_contain_text("prune freed")
        _refused_elsewhere(page, fleet, "paula")
        assert page.problems == []
    finally:
        context.close()


@pytest.mark.e2e
def test_browser_administrator_manages_users_and_reads_the_audit_log(browser, fleet):
    context, page = _signed_in(browser, fleet, "ada")
    try:
        page.click("header nav a[href='/users']")
        expect(page.locator("h1")).to_have_text("Users")
        page.fill("form.grid input[name=name]", "newbie")
        page.select_option("form.grid select[name=role]", "help-desk")
        page.fill("form.grid input[name=password]", PASSWORD)
        page.click("text=Create user")
        expect(page.locator("main")).to_contain_text("created user newbie (help-desk)")
        _shot(page, "users")
        page.click("header nav a[href='/audit']")
        expect(page.locator("h1")).to_have_text("Audit log")
        rows = page.locator("[data-testid=audit-row]").all_text_contents()
        assert any("user:ada" in r and "create-user" in r and "newbie" in r for r in rows)
        _shot(page, "audit")
        _refused_elsewhere(page, fleet, "ada")
        page.click("text=Sign out")
        page.wait_for_url(fleet.server.url + "/login")
        page.goto(fleet.server.url + "/users")
        assert page.url.endswith("/login")
        assert page.problems == []
    finally:
        context.close()


@pytest.mark.e2e
def test_browser_task_progress_updates_without_a_reload(browser, fleet):
    """A migration's progress page polls (htmx, under the CSP) and shows the endpoints'
    reports as they arrive, until the task is done."""
    from strata.server.catalog.db import open_catalog

    engine, sessions = open_catalog(f"sqlite:///{fleet.server.data / 'catalog.sqlite'}")
    ctx = SimpleNamespace(write=lambda: _committing(sessions))
    eids = [e["id"] for e in fleet.server.admin("GET", "/endpoints")
            if e["hostname"].startswith("lab-")]
    tid = _task(ctx, {eids[0]: ("applied", 100.0), eids[1]: ("downloading", 10.0)},
                hostile=False)
    context, page = _signed_in(browser, fleet, "hana")
    try:
        page.goto(fleet.server.url + f"/tasks/{tid}")
        expect(page.locator("[data-testid=task-state]")).to_have_text("running")
        _shot(page, "task")
        with sessions() as db:
            db.execute(update(Assignment).where(Assignment.endpoint_id == eids[1])
                       .values(state="applied", percent=100.0))
            db.commit()
        expect(page.locator("[data-testid=task-state]")).to_have_text("done", timeout=15_000)
        assert "100% of 2 endpoint(s) done" in page.text_content("#task-progress")
        assert page.problems == []
    finally:
        context.close()
        engine.dispose()


@pytest.mark.e2e
def test_browser_an_image_manager_cancels_and_retries_a_task(browser, fleet):
    """The buttons on the task page: cancel skips the endpoint not started, the one under
    way goes on; retry queues the cancelled and failed ones again. The help desk does
    not see the buttons of a migration."""
    from strata.server.catalog.db import open_catalog

    engine, sessions = open_catalog(f"sqlite:///{fleet.server.data / 'catalog.sqlite'}")
    ctx = SimpleNamespace(write=lambda: _committing(sessions))
    eids = sorted(e["id"] for e in fleet.server.admin("GET", "/endpoints")
                  if e["hostname"].startswith("lab-"))
    tid = _task(ctx, {eids[0]: ("assigned", 0.0), eids[1]: ("downloading", 30.0)},
                hostile=False)
    context, page = _signed_in(browser, fleet, "hana")
    try:
        page.goto(fleet.server.url + f"/tasks/{tid}")
        expect(page.locator("[data-testid=task-state]")).to_have_text("running")
        assert page.locator("[data-testid=task-cancel]").count() == 0
    finally:
        context.close()
    context, page = _signed_in(browser, fleet, "ivan")
    try:
        page.goto(fleet.server.url + "/tasks")
        page.click(f"form[action='/tasks/{tid}/cancel'] button")
        expect(page.locator("[data-testid=task-done]")).to_contain_text(
            "cancelled: 1 endpoint(s) not started are skipped")
        rows = page.locator("[data-testid=task-endpoint]")
        expect(rows).to_have_count(2)
        states = sorted(r.locator("td").nth(1).text_content() for r in rows.all())
        assert states == ["cancelled", "downloading"]
        _shot(page, "task-cancelled")
        with sessions() as db:  # the one under way fails
            db.execute(update(Assignment).where(Assignment.endpoint_id == eids[1])
                       .values(state="failed", detail="not enough disk space"))
            db.commit()
        page.reload()
        page.click("[data-testid=task-retry]")
        expect(page.locator("[data-testid=task-done]")).to_contain_text(
            "queued again: 2 endpoint(s)")
        expect(page.locator("[data-testid=task-state]")).to_have_text("running")
        assert page.locator("[data-testid=task-retry]").count() == 0
        assert page.problems == []
    finally:
        context.close()
        engine.dispose()


@pytest.mark.e2e
def test_browser_software_and_storage_reports(browser, fleet):
    """The fleet summary fills in by itself once computed in the background; a package
    leads to the endpoints that have it; storage per CVD; a CSV link on each table."""
    context, page = _signed_in(browser, fleet, "hana")
    try:
        page.click("header nav a[href='/reports/software']")
        expect(page.locator("#software-summary table")).to_be_visible(timeout=30_000)
        page.click("#software-summary a:text-is('openssl')")
        rows = page.locator("[data-testid=software-row]")
        expect(rows).to_have_count(1)
        assert "3.0.15-1~deb12u1" in rows.first.text_content()
        _shot(page, "software")
        page.goto(fleet.server.url + "/reports/storage")
        expect(page.locator("[data-testid=storage-row]").first).to_be_visible(timeout=30_000)
        assert page.locator("[data-testid=csv]").count() == 1  # the page's own export
        _shot(page, "storage")
        assert page.problems == []
    finally:
        context.close()


class _committing:
    """`ctx.write()` for a plain sessionmaker: a session committed at the end."""

    def __init__(self, sessions: object):
        self.db = sessions()  # type: ignore[operator]

    def __enter__(self) -> object:
        return self.db

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.db.commit()
        self.db.close()


@pytest.mark.e2e
def test_browser_a_portal_user_downloads_their_own_file_and_nothing_else(browser, fleet):
    eid = fleet.agent.endpoint_id
    fleet.server.admin("POST", f"/endpoints/{eid}/portal-accounts",
                       {"name": "alice", "password": PASSWORD})
    other = next(e["id"] for e in fleet.server.admin("GET", "/endpoints")
                 if e["hostname"] == "lab-01")
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    try:
        page.goto(fleet.server.url + "/portal")
        assert page.url.endswith("/portal/login")
        page.fill("input[name=name]", "alice")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(fleet.server.url + "/portal")
        page.click("[data-testid=portal-snapshot] a")
        expect(page.locator("[data-testid=portal-entry]")).to_have_count(20)
        page.fill("input[name=q]", "doc-01")
        page.click("text=Find")
        expect(page.locator("[data-testid=portal-entry]")).to_have_count(10)
        _shot(page, "portal")
        with page.expect_download() as got:
            page.locator("[data-testid=portal-entry]", has_text="doc-012.txt").locator(
                "text=Download").click()
        assert Path(got.value.path()).read_bytes() == \
            (fleet.root / "home/alice/doc-012.txt").read_bytes()
        # The IT console stays closed to a portal user, and guessing URLs gets nothing.
        page.goto(fleet.server.url + "/endpoints")
        assert page.url.endswith("/login")
        snap = fleet.server.admin("GET", f"/endpoints/{eid}")["snapshot_list"][0]["id"]
        resp = page.goto(fleet.server.url + f"/portal/snapshots/{snap}/download?path_hex="
                         + b"etc/hostname".hex())
        assert resp.status == 403
        resp = page.request.get(fleet.server.url + f"/api/v1/admin/endpoints/{other}")
        assert resp.status == 401
    finally:
        context.close()


@pytest.mark.e2e
def test_browser_renders_a_hostile_hostname_as_text(browser, fleet):
    context, page = _signed_in(browser, fleet, "ada")
    try:
        for path in ("/", "/endpoints"):
            page.goto(fleet.server.url + path)
            assert XSS in page.text_content("main"), path
            assert page.title() != "pwned"
            assert page.locator("main img").count() == 0
        assert page.problems == []
    finally:
        context.close()

"""The web console at `/`: sign-in with sessions, CSRF on every form, a content security
policy, every endpoint-supplied string escaped, each role's pages and nothing else, the
dashboard and the endpoint search; then the same in a real browser (headless Chromium
driven by Playwright) against a real server with enrolled endpoints."""

from __future__ import annotations

import os
import re
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

from server_fixtures import Agent, Server, device, enroll_request, write_documents
from strata.model.roles import ROLES, Permission
from strata.server.app import create_app
from strata.server.catalog.models import Cvd, SnapshotRecord, UserSession
from strata.server.console.chart import storage_chart
from strata.server.console.pages import NAV
from strata.server.console.render import HERE
from strata.server.context import ServerSettings
from strata.server.services import fleet as fleet_service
from strata.server.services import users
from strata.server.services.fleet import HistoryPoint

ADMIN = "/api/v1/admin"
PASSWORD = "correct horse battery"


@pytest.fixture(autouse=True)
def quick_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process servers hash with scrypt N=2^10 rather than 2^15: each hash records
    its own parameters, so nothing else changes, and a test makes a dozen of them."""
    monkeypatch.setattr(users, "SCRYPT_LOG_N", 10)
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


def test_a_wrong_password_is_refused_in_the_page_and_locks_after_five(console):
    c = console.client
    for _ in range(5):
        resp = sign_in(c, "hana", "not the password")
        assert resp.status_code == 401 and "unknown user name or wrong password" in resp.text
    resp = sign_in(c, "hana")
    assert resp.status_code == 429 and "too many failed sign-ins" in resp.text
    assert sign_in(c, "nobody").status_code == 401  # an unknown name reads the same


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

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--no-first-run"]
SCREENSHOTS = os.environ.get("STRATA_SCREENSHOTS", "")  # e.g. docs/screenshots


def _browser_or_skip() -> None:
    if CHROMIUM.exists() and sync_playwright is not None:
        return
    if os.environ.get("STRATA_REQUIRE_BROWSER"):
        pytest.fail(f"{CHROMIUM} is missing and STRATA_REQUIRE_BROWSER is set "
                    "(apt-get install chromium)")
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")


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
        agent = Agent(server, root, base / "agent-state")
        agent.enroll(server.create_token())
        agent.backup()
        for host in ("lab-01", "lab-02", XSS):
            resp = enroll_request(server, server.create_token(), host)
            assert resp.status_code == 200, resp.text
            device(server, resp.json()["credential"]).close()
        resp = enroll_request(server, server.create_token(require_approval=True), "newcomer")
        assert resp.status_code == 200
        yield SimpleNamespace(server=server, tokens=tokens, agent=agent)
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

"""Users and roles: every admin route needs a permission, and each role gets exactly its
own (walked from the OpenAPI document, so a new route without one fails here); personal
API tokens act as their user, are revocable and audited under the user's name; passwords
are scrypt hashes; sign-ins are rate-limited and sessions expire; the CLI manages it all."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import Depends
from fastapi.testclient import TestClient
from sqlalchemy import update

import cost_factors
from server_fixtures import Server, assert_one_line_error, strata
from strata.cli.confirm import NotConfirmed
from strata.model.roles import ROLES, Permission
from strata.server import passwords
from strata.server.app import create_app
from strata.server.catalog.models import User, UserSession
from strata.server.context import ServerContext, ServerSettings
from strata.server.deps import admin_router, get_ctx, label_permissions
from strata.server.passwords import check_password, hash_password
from strata.server.services import signin, users
from strata.server.services.signin import AddressThrottle, LoginRefused, TooManyAttempts

ADMIN = "/api/v1/admin"
PASSWORD = "correct horse battery"


def _server(data: Path, catalog: str = "") -> tuple[TestClient, ServerContext]:
    app = create_app(ServerSettings(data_dir=data, catalog_url=catalog))
    client = TestClient(app)
    token = (data / "admin.token").read_text().strip()
    client.headers["Authorization"] = f"Bearer {token}"
    return client, app.state.ctx


def _make_user(client: TestClient, name: str, role: str) -> str:
    """The user's personal API token."""
    resp = client.post(f"{ADMIN}/users", json={"name": name, "role": role,
                                                "password": PASSWORD})
    assert resp.status_code == 200, resp.text
    resp = client.post(f"{ADMIN}/users/{name}/tokens", json={"label": "test"})
    assert resp.status_code == 200, resp.text
    return resp.json()["token"]


@pytest.fixture()
def staff(tmp_path: Path) -> Iterator[SimpleNamespace]:
    client, ctx = _server(tmp_path / "data")
    with client:
        tokens = {role: _make_user(client, role.replace("-", ""), role) for role in ROLES}
        yield SimpleNamespace(client=client, ctx=ctx, tokens=tokens)


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _admin_operations(client: TestClient) -> list[tuple[str, str, object]]:
    doc = client.get("/api/v1/openapi.json").json()
    ops = []
    for path, methods in doc["paths"].items():
        if not path.startswith(ADMIN + "/"):
            continue
        for method, op in methods.items():
            # A route that names no permission is kept for administrators, and fails here:
            # give it one (deps.require), so that each role gets what its job needs.
            assert not op.get("x-permission-undeclared"), \
                f"{method.upper()} {path} declares no permission"
            ops.append((method.upper(), path, op.get("x-permission")))
    return ops


def _concrete(path: str, permission: object) -> list[tuple[str, Permission]]:
    """The URLs to try for one route, with the permission each needs."""
    if isinstance(permission, dict):  # a permission per value of a path parameter
        (param, by_value), = permission.items()
        return [(path.replace("{" + param + "}", value), Permission(p))
                for value, p in by_value.items()]
    assert isinstance(permission, str), f"{path} declares no x-permission"
    url = re.sub(r"\{(tid|token_id)\}", "999999", path)
    return [(re.sub(r"\{[^}]+\}", "nobody-here", url), Permission(permission))]


def test_every_admin_route_gives_each_role_exactly_its_permission(staff):
    ops = _admin_operations(staff.client)
    assert len(ops) > 40  # the whole admin API, not a part of it
    tried = 0
    for method, path, permission in ops:
        for url, needed in _concrete(path, permission):
            # No credential at all: 401, whatever the route.
            anon = staff.client.request(method, url, headers={"Authorization": ""}, json={})
            assert anon.status_code == 401, (method, url, anon.text)
            for role, token in staff.tokens.items():
                resp = staff.client.request(method, url, headers=_as(token), json={})
                refused = resp.status_code == 403 and "does not allow" in resp.text
                assert refused == (needed not in ROLES[role]), (role, method, url, needed,
                                                                 resp.status_code, resp.text)
                assert resp.status_code < 500, (role, method, url, resp.text)
                tried += 1
    assert tried >= 4 * len(ops)


def test_the_roles_follow_mirages_split():
    assert ROLES["administrator"] == frozenset(Permission)
    help_desk = ROLES["help-desk"]
    assert {Permission.VIEW, Permission.REVERT, Permission.RESTORE} == help_desk
    assert Permission.LAYERS in ROLES["image-manager"]
    assert Permission.PROTECTION in ROLES["protection-manager"]
    assert Permission.PRUNE in ROLES["protection-manager"]
    for role in ("help-desk", "image-manager", "protection-manager"):
        assert Permission.USERS not in ROLES[role] and Permission.TOKENS not in ROLES[role]


def test_an_admin_route_without_a_permission_is_for_administrators_and_flagged(staff):
    router = admin_router("careless")

    @router.get("/careless")
    def careless(ctx: ServerContext = Depends(get_ctx)) -> dict:
        return {"ok": True}

    label_permissions(router.routes)
    app = staff.client.app
    app.include_router(router)
    app.openapi_schema = None  # built again with the new route
    c = staff.client
    for role, token in staff.tokens.items():
        resp = c.get(f"{ADMIN}/careless", headers=_as(token))
        if role == "administrator":
            assert resp.status_code == 200
        else:
            assert resp.status_code == 403 and "declares no permission" in resp.text, role
    assert c.get(f"{ADMIN}/careless").status_code == 200  # the break-glass token
    op = c.get("/api/v1/openapi.json").json()["paths"][f"{ADMIN}/careless"]["get"]
    assert op["x-permission"] == "server" and op["x-permission-undeclared"] is True


def test_a_role_is_refused_outside_its_job_and_served_inside_it(staff):
    c, t = staff.client, staff.tokens
    resp = c.put(f"{ADMIN}/policies/retention", headers=_as(t["help-desk"]),
                 json={"daily": 7})
    assert resp.status_code == 403 and "'protection' permission" in resp.json()["detail"]
    resp = c.put(f"{ADMIN}/policies/retention", headers=_as(t["protection-manager"]),
                 json={"daily": 7})
    assert resp.status_code == 200, resp.text
    # The layer rules policy belongs to image managers, not protection managers.
    assert c.get(f"{ADMIN}/policies/layers",
                 headers=_as(t["protection-manager"])).status_code == 403
    assert c.get(f"{ADMIN}/policies/layers", headers=_as(t["image-manager"])).status_code == 200
    assert c.get(f"{ADMIN}/endpoints", headers=_as(t["help-desk"])).status_code == 200
    assert c.get(f"{ADMIN}/users", headers=_as(t["help-desk"])).status_code == 403
    me = c.get(f"{ADMIN}/me", headers=_as(t["image-manager"])).json()
    assert me["name"] == "imagemanager" and me["role"] == "image-manager"
    assert "layers" in me["permissions"] and "users" not in me["permissions"]


def test_a_new_role_is_in_force_at_the_next_request(staff):
    c, token = staff.client, staff.tokens["image-manager"]
    assert c.get(f"{ADMIN}/layers", headers=_as(token)).status_code == 200
    resp = c.put(f"{ADMIN}/users/imagemanager/role", json={"role": "help-desk"})
    assert resp.status_code == 200 and resp.json()["role"] == "help-desk"
    assert c.get(f"{ADMIN}/layers", headers=_as(token)).status_code == 403
    assert c.get(f"{ADMIN}/me", headers=_as(token)).json()["role"] == "help-desk"
    assert c.put(f"{ADMIN}/users/imagemanager/role", json={"role": "root"}
                 ).status_code == 422
    log = c.get(f"{ADMIN}/audit").json()
    assert {"action": "set-role", "target": "imagemanager"}.items() <= log[0].items()
    assert log[0]["detail"] == {"role": "help-desk", "was": "image-manager"}


def test_the_audit_log_names_the_user(staff):
    c, t = staff.client, staff.tokens
    resp = c.post(f"{ADMIN}/collections", headers=_as(t["image-manager"]),
                  json={"name": "lab", "rule": {"os": "debian*"}})
    assert resp.status_code == 200, resp.text
    c.post(f"{ADMIN}/tokens", json={"uses": 1})  # the break-glass admin.token
    log = c.get(f"{ADMIN}/audit").json()
    actors = {e["action"]: e["actor"] for e in log}
    assert actors["set-collection"] == "user:imagemanager"
    assert actors["create-token"] == "admin"
    assert actors["create-user"] == "admin"


def test_a_revoked_token_or_a_deleted_user_stops_working_at_once(staff):
    c = staff.client
    token = staff.tokens["help-desk"]
    listed = c.get(f"{ADMIN}/users/helpdesk/tokens").json()
    assert [t["revoked"] for t in listed] == [False]
    assert listed[0]["last_used"] is None or listed[0]["last_used"]
    assert c.get(f"{ADMIN}/endpoints", headers=_as(token)).status_code == 200
    second = c.post(f"{ADMIN}/users/helpdesk/tokens", json={}).json()["token"]
    c.delete(f"{ADMIN}/users/helpdesk/tokens/{listed[0]['id']}").raise_for_status()
    resp = c.get(f"{ADMIN}/endpoints", headers=_as(token))
    assert resp.status_code == 403 and "not an admin token" in resp.json()["detail"]
    assert c.get(f"{ADMIN}/endpoints", headers=_as(second)).status_code == 200
    # Another user's token id cannot be revoked through this user's name.
    other = c.get(f"{ADMIN}/users/imagemanager/tokens").json()[0]["id"]
    assert c.delete(f"{ADMIN}/users/helpdesk/tokens/{other}").status_code == 404
    c.delete(f"{ADMIN}/users/helpdesk").raise_for_status()
    assert c.get(f"{ADMIN}/endpoints", headers=_as(second)).status_code == 403
    assert "helpdesk" not in {u["name"] for u in c.get(f"{ADMIN}/users").json()}


def test_bad_user_requests_get_one_plain_refusal(staff):
    c = staff.client
    for body in ({"name": "Bob", "role": "help-desk", "password": PASSWORD},
                 {"name": "bob", "role": "superuser", "password": PASSWORD},
                 {"name": "bob", "role": "help-desk", "password": "short"},
                 {"name": "bob", "role": "help-desk", "password": "x" * 5000},
                 {"name": "<script>", "role": "help-desk", "password": PASSWORD}):
        assert c.post(f"{ADMIN}/users", json=body).status_code == 422, body
    resp = c.post(f"{ADMIN}/users", json={"name": "helpdesk", "role": "help-desk",
                                          "password": PASSWORD})
    assert resp.status_code == 409 and "exists already" in resp.json()["detail"]
    resp = c.post(f"{ADMIN}/users", json={"name": "admin", "role": "help-desk",
                                          "password": PASSWORD})
    assert resp.status_code == 409 and "break-glass" in resp.json()["detail"]
    assert c.put(f"{ADMIN}/users/nobody/password",
                 json={"password": PASSWORD}).status_code == 404


def test_passwords_are_salted_scrypt_hashes(monkeypatch):
    # The server's own cost (the suite hashes at a test cost: tests/cost_factors.py), for one
    # hash and its check: 0.2-0.5 s of CPU each.
    monkeypatch.setattr(passwords, "SCRYPT_LOG_N", cost_factors.PRODUCT_PASSWORD_LOG_N)
    real = hash_password(PASSWORD)
    assert real.startswith("scrypt$15$8$3$") and PASSWORD not in real
    monkeypatch.setattr(passwords, "SCRYPT_LOG_N", cost_factors.TEST_LOG_N)
    assert check_password(PASSWORD, real)  # older hashes keep their parameters
    a, b = hash_password(PASSWORD), hash_password(PASSWORD)
    assert a != b and a.startswith(f"scrypt${cost_factors.TEST_LOG_N}$8$3$")  # salted
    assert check_password(PASSWORD, a) and not check_password(PASSWORD + "!", a)
    assert not check_password(PASSWORD, "") and not check_password(PASSWORD, "md5$x")


def test_sign_ins_lock_an_account_after_repeated_failures(staff):
    ctx, throttle = staff.ctx, AddressThrottle()
    for i in range(signin.LOCK_AFTER):
        with pytest.raises(LoginRefused):
            users.login(ctx, "helpdesk", f"wrong {i}", f"10.0.0.{i}", throttle)
    # Locked: even the right password is not checked now.
    with pytest.raises(TooManyAttempts):
        users.login(ctx, "helpdesk", PASSWORD, "10.0.0.99", throttle)
    with ctx.write() as db:  # the lock runs out
        db.execute(update(User).where(User.name == "helpdesk")
                   .values(locked_until=datetime.now(UTC) - timedelta(seconds=1)))
    signed = users.login(ctx, "helpdesk", PASSWORD, "10.0.0.99", throttle)
    assert signed.staff.role == "help-desk"
    actions = [e["action"] for e in staff.client.get(f"{ADMIN}/audit").json()]
    assert actions.count("login-failed") == signin.LOCK_AFTER and "login" in actions


def test_one_address_trying_many_names_is_throttled(staff):
    throttle = AddressThrottle(limit=3)
    for name in ("ann", "ben", "cat"):
        with pytest.raises(LoginRefused, match="unknown user name or wrong password"):
            users.login(staff.ctx, name, PASSWORD, "10.9.9.9", throttle)
    with pytest.raises(TooManyAttempts):
        users.login(staff.ctx, "helpdesk", PASSWORD, "10.9.9.9", throttle)
    assert users.login(staff.ctx, "helpdesk", PASSWORD, "10.9.9.10", throttle)


def test_sessions_expire_when_idle_or_old_and_end_with_a_new_password(staff):
    ctx, throttle = staff.ctx, AddressThrottle()
    now = datetime.now(UTC)
    for field, when in (("last_seen", now - signin.SESSION_IDLE - timedelta(seconds=5)),
                        ("expires_at", now - timedelta(seconds=1))):
        signed = users.login(ctx, "imagemanager", PASSWORD, "10.1.1.1", throttle)
        found = users.session_staff(ctx, signed.session)
        assert found is not None and found[0].name == "imagemanager"
        assert found[1] == signed.csrf
        with ctx.write() as db:
            db.execute(update(UserSession).values({field: when}))
        assert users.session_staff(ctx, signed.session) is None
    signed = users.login(ctx, "imagemanager", PASSWORD, "10.1.1.1", throttle)
    staff.client.put(f"{ADMIN}/users/imagemanager/password",
                     json={"password": PASSWORD + " 2"}).raise_for_status()
    assert users.session_staff(ctx, signed.session) is None
    with pytest.raises(LoginRefused):
        users.login(ctx, "imagemanager", PASSWORD, "10.1.1.1", throttle)
    assert users.login(ctx, "imagemanager", PASSWORD + " 2", "10.1.1.1", throttle)


def test_users_and_tokens_on_both_catalog_databases(catalogs, tmp_path):
    client, ctx = _server(tmp_path / "data", catalogs.url(tmp_path))
    with client:
        token = _make_user(client, "pat", "protection-manager")
        assert client.get(f"{ADMIN}/me", headers=_as(token)).json()["name"] == "pat"
        signed = users.login(ctx, "pat", PASSWORD, "127.0.0.1", AddressThrottle())
        assert users.session_staff(ctx, signed.session) is not None
        client.delete(f"{ADMIN}/users/pat").raise_for_status()  # sessions and tokens too
        assert users.session_staff(ctx, signed.session) is None


@pytest.mark.e2e
def test_user_commands_end_to_end(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    server = Server(tmp_path / "data", signing=False).start()
    try:
        common = ("--server", server.url, "--admin-token-file", server.token_file)
        out = strata("user", "create", "hana", "--role", "help-desk", "--password-file", pw,
                     *common).stdout
        assert "created user hana (help-desk)" in out
        token = strata("user", "token", "hana", "--label", "laptop", *common).stdout.strip()
        assert token.startswith("susr_")
        listed = strata("user", "list", "--json", *common).stdout
        assert '"role": "help-desk"' in listed and '"tokens": 1' in listed
        # The token works as the CLI's credential, within the role.
        tok_file = tmp_path / "hana.token"
        tok_file.write_text(token)
        mine = ("--server", server.url, "--admin-token-file", tok_file)
        strata("endpoint", "list", *mine)
        proc = strata("token", "create", *mine, rc=2)
        assert_one_line_error(proc, "403", "help-desk", "'tokens' permission")
        proc = strata("user", "create", "Bad Name", "--role", "help-desk", "--password-file",
                      pw, *common, rc=2)
        assert_one_line_error(proc, "not valid")
        proc = strata("user", "create", "x", "--role", "root", *common, rc=2)
        assert_one_line_error(proc, "unknown role")
        proc = strata("user", "delete", "hana", *common, rc=None)
        assert_one_line_error(proc, "refusing without --yes", rc=NotConfirmed.exit_code)
        assert_one_line_error(strata("user", "delete", "nobody", "--yes", *common, rc=2),
                              "no user 'nobody'")
        assert "hana is now image-manager" in strata("user", "role", "hana", "image-manager",
                                                      *common).stdout
        assert_one_line_error(strata("user", "role", "hana", "root", *common, rc=2),
                              "unknown role")
        strata("user", "token", "hana", "--revoke", "1", *common)
        assert_one_line_error(strata("endpoint", "list", *mine, rc=2), "403")
        strata("user", "delete", "hana", "--yes", *common)
        assert "hana" not in strata("user", "list", *common).stdout
    finally:
        server.stop()
        server.kill()

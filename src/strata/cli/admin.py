"""Admin commands (`strata token …`, `strata endpoint …`, `strata policy …`): thin
clients of the server's admin API."""

from __future__ import annotations

import json as jsonlib
import os
from pathlib import Path

import typer
from rich.table import Table

from strata.errors import StrataError

from .output import console, human_bytes, print_json

SERVER = typer.Option(None, "--server", envvar="STRATA_SERVER", help="Server URL.")
TOKEN_FILE = typer.Option(None, "--admin-token-file", help="File with the admin token "
                          "(or set STRATA_ADMIN_TOKEN).")
JSON = typer.Option(False, "--json", help="Print JSON.")

token_app = typer.Typer(help="Enrollment tokens.", no_args_is_help=True)
endpoint_app = typer.Typer(help="Enrolled endpoints.", no_args_is_help=True)
policy_app = typer.Typer(help="Upload, retention, bandwidth and layer policies.",
                        no_args_is_help=True)


def admin_token(token_file: Path | None) -> str:
    token = os.environ.get("STRATA_ADMIN_TOKEN")
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise StrataError(f"cannot read admin token file {token_file}: "
                              f"{exc.strerror}") from None
    if not token:
        raise StrataError("no admin token: pass --admin-token-file or set STRATA_ADMIN_TOKEN")
    return token


def admin_call(server: str | None, token_file: Path | None, method: str, path: str,
               body: object = None) -> object:
    import httpx  # only admin commands need it: keep it off every command's start-up

    if not server:
        raise StrataError("no server: pass --server URL or set STRATA_SERVER")
    token = admin_token(token_file)
    try:
        resp = httpx.request(method, server.rstrip("/") + path, json=body, timeout=60,
                             headers={"Authorization": f"Bearer {token}"})
    except httpx.TransportError as exc:
        raise StrataError(f"cannot reach {server}: {exc.__class__.__name__}") from None
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    if not 200 <= resp.status_code < 300:
        detail = _detail(doc) if doc is not None else resp.text[:200].strip()
        raise StrataError(f"server refused ({resp.status_code}): "
                          f"{detail or resp.reason_phrase}")
    if doc is None:
        raise StrataError(f"{server} did not answer with JSON: is it a Strata server?")
    return doc


def _detail(doc: object) -> str:
    """The reason in an error answer: FastAPI's `detail`, a string or a list of
    validation errors (shown as `field: message`, not as a Python repr)."""
    detail = doc.get("detail", doc) if isinstance(doc, dict) else doc
    if isinstance(detail, list):
        parts = []
        for err in detail:
            if not isinstance(err, dict):
                parts.append(str(err))
                continue
            loc = [str(x) for x in err.get("loc", []) if x not in ("body", "query", "path")]
            field = ".".join(loc)
            got = f" (got {err['input']!r})" if isinstance(err.get("input"), str | int) else ""
            parts.append(f"{field + ': ' if field else ''}{err.get('msg', err)}{got}")
        return "; ".join(parts)
    return str(detail)


def path_part(value: str, what: str) -> str:
    """One segment of an API path, from user input: never empty, and quoted so that a
    '/', '?', '#' or '..' reaches the server as text, not as a different URL."""
    from urllib.parse import quote

    if not value.strip():
        raise StrataError(f"{what} must not be empty")
    if "/" in value or not value.strip("."):
        raise StrataError(f"{what} {value!r} is not valid")
    return quote(value, safe="")


@token_app.command("create")
def token_create(uses: int = typer.Option(1, "--uses", help="How many enrollments (0 = "
                                          "unlimited)."),
                 expires: str = typer.Option("24h", "--expires", help="e.g. 30m, 24h, 7d; "
                                             "'never' for no expiry."),
                 require_approval: bool = typer.Option(False, "--require-approval"),
                 server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                 json: bool = JSON) -> None:
    """Create an enrollment token for agents."""
    doc = admin_call(server, admin_token_file, "POST", "/api/v1/admin/tokens",
                     {"uses": uses or None, "expires": None if expires == "never" else expires,
                      "require_approval": require_approval})
    if json:
        print_json(doc)
    else:
        console.print(doc["token"], highlight=False)  # type: ignore[index]


@endpoint_app.command("list")
def endpoint_list(pending: bool = typer.Option(False, "--pending", help="Only those waiting "
                                               "for approval."),
                  server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                  json: bool = JSON) -> None:
    """List endpoints."""
    rows = admin_call(server, admin_token_file, "GET",
                      f"/api/v1/admin/endpoints?pending={str(pending).lower()}")
    if json:
        print_json(rows)
        return
    table = Table("ID", "Hostname", "OS", "State", "Last seen", "Snapshots", "Layers",
                  "Update")
    for r in rows:  # type: ignore[union-attr]
        table.add_row(r["id"][:8], r["hostname"], r["os"], r["state"],
                      str(r["last_seen"] or "")[:19], str(r["snapshots"]),
                      *_layer_cells(r.get("layers")))
    console.print(table)


def _layer_cells(doc: dict | None) -> tuple[str, str]:
    """What is assigned, and where the endpoint stands: assigned, downloading (percent),
    ready, applied, failed (why)."""
    if not doc:
        return "", ""
    state = doc["state"]
    if state == "downloading":
        state = f"downloading {doc['percent']:.0f}%"
    elif state == "failed":
        state = f"failed: {doc['detail'][:60]}"
    elif doc.get("downloaded_bytes"):
        state += f" ({human_bytes(doc['downloaded_bytes'])} down)"
    return ", ".join(doc["layers"]), state


def _endpoint_action(action: str, done: str, endpoint_id: str, server: str | None,
                     token_file: Path | None, json: bool) -> None:
    doc = admin_call(server, token_file, "POST",
                     f"/api/v1/admin/endpoints/{path_part(endpoint_id, 'endpoint id')}/{action}")
    print_json(doc) if json else console.print(f"{done} {doc['id']}")  # type: ignore[index]


@endpoint_app.command("approve")
def endpoint_approve(endpoint_id: str, server: str | None = SERVER,
                     admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Approve a pending endpoint."""
    _endpoint_action("approve", "approved", endpoint_id, server, admin_token_file, json)


@endpoint_app.command("revoke")
def endpoint_revoke(endpoint_id: str, server: str | None = SERVER,
                    admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Revoke an endpoint's credential."""
    _endpoint_action("revoke", "revoked", endpoint_id, server, admin_token_file, json)


@endpoint_app.command("show")
def endpoint_show(endpoint_id: str, server: str | None = SERVER,
                  admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """An endpoint's inventory, snapshots and recent transactions."""
    doc: dict = admin_call(server, admin_token_file, "GET",  # type: ignore[assignment]
                           f"/api/v1/admin/endpoints/{path_part(endpoint_id, 'endpoint id')}")
    if json:
        print_json(doc)
        return
    inv = doc.get("inventory") or {}
    hw = inv.get("hardware", {})
    console.print(f"[bold]{doc['hostname']}[/] {doc['id']}  state: {doc['state']}  "
                  f"last seen: {str(doc['last_seen'])[:19]}", highlight=False)
    console.print(f"{inv.get('os_name', doc['os'])}; {hw.get('vendor', '')} "
                  f"{hw.get('model', '')}; {inv.get('cpu', {}).get('count', '?')} CPUs; "
                  f"{human_bytes(inv.get('ram_bytes', 0))} RAM", highlight=False)
    if doc.get("layers"):
        layers, state = _layer_cells(doc["layers"])
        console.print(f"layers: {layers}; update: {state}; applied: "
                      f"{', '.join(doc['layers']['applied']) or 'none'}"
                      + (f"\n  {doc['layers']['detail']}" if doc["layers"]["detail"] else ""),
                      highlight=False)
    table = Table("Snapshot", "Time", "Trigger", "Files", "Size", "New")
    for s in doc["snapshot_list"]:
        table.add_row(s["id"][:8], str(s["time"])[:19], s["trigger"], str(s["files"]),
                      human_bytes(s["bytes_total"]), human_bytes(s["bytes_new"]))
    console.print(table)
    tx = Table("Transaction", "Kind", "Result", "Changed", "Read", "New", "Wire", "Seconds")
    for t in doc["transactions"]:
        tx.add_row(str(t["id"]), t["kind"], t["result"], str(t["files_changed"]),
                   human_bytes(t["bytes_before_dedup"]), human_bytes(t["bytes_after_dedup"]),
                   human_bytes(t["bytes_on_wire"]), f"{t['seconds']:.1f}")
    console.print(tx)


POLICY_KIND = typer.Argument(..., help="upload, retention, bandwidth or layers")


@policy_app.command("show")
def policy_show(kind: str = POLICY_KIND, server: str | None = SERVER,
                admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Print a policy document (always JSON; --json is accepted like everywhere)."""
    print_json(admin_call(server, admin_token_file, "GET",
                          f"/api/v1/admin/policies/{path_part(kind, 'policy kind')}"))


@policy_app.command("set")
def policy_set(kind: str = POLICY_KIND,
               file: Path = typer.Argument(..., help="JSON document ('-' for stdin)."),
               server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
               json: bool = JSON) -> None:
    """Replace a policy document."""
    text = typer.get_text_stream("stdin").read() if str(file) == "-" else file.read_text()
    try:
        doc = jsonlib.loads(text)
    except ValueError as exc:
        raise StrataError(f"{file} is not JSON: {exc}") from None
    print_json(admin_call(server, admin_token_file, "PUT",
                          f"/api/v1/admin/policies/{path_part(kind, 'policy kind')}", doc))

"""Endpoint commands (`strata endpoint …`): list, show, approve, revoke, tag, and the
operations on one endpoint (revert, restore onto new hardware, provision)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from .admin_args import JSON, SERVER, TOKEN_FILE, client, layer_ref, layer_refs, print_model
from .output import console, human_bytes, print_json, safe
from .signing import KEYS, PASSPHRASE_FILE, publisher_for, signable_refs, signed_after

if TYPE_CHECKING:
    from pydantic import BaseModel

    from strata.model.admin import AssignmentStatus

endpoint_app = typer.Typer(help="Enrolled endpoints.", no_args_is_help=True)


@endpoint_app.command("list")
def endpoint_list(pending: bool = typer.Option(False, "--pending", help="Only those waiting "
                                               "for approval."),
                  server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                  json: bool = JSON) -> None:
    """List endpoints."""
    rows = client(server, admin_token_file).endpoints(pending)
    if json:
        print_model(rows)
        return
    table = Table("ID", "Hostname", "OS", "State", "Last seen", "Snapshots", "Layers",
                  "Update")
    for r in rows:
        table.add_row(r.id[:8], r.hostname, r.os, r.state, _time(r.last_seen),
                      str(r.snapshots), *_layer_cells(r.layers))
    console.print(table)


def _time(when: datetime | None) -> str:
    return when.isoformat()[:19] if when else ""


def _layer_cells(status: AssignmentStatus | None) -> tuple[str, str]:
    """What is assigned, and where the endpoint stands: assigned, downloading (percent),
    ready, applied, failed (why)."""
    if not status:
        return "", ""
    state = status.state
    if state == "downloading":
        state = f"downloading {status.percent:.0f}%"
    elif state == "failed":
        state = f"failed: {status.detail[:60]}"
    elif status.downloaded_bytes:
        state += f" ({human_bytes(status.downloaded_bytes)} down)"
    return ", ".join(status.layers), state


@endpoint_app.command("approve")
def endpoint_approve(endpoint_id: str, server: str | None = SERVER,
                     admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Approve a pending endpoint."""
    doc = client(server, admin_token_file).approve(endpoint_id)
    print_model(doc) if json else console.print(f"approved {doc.id}")


@endpoint_app.command("revoke")
def endpoint_revoke(endpoint_id: str, server: str | None = SERVER,
                    admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Revoke an endpoint's credential."""
    doc = client(server, admin_token_file).revoke(endpoint_id)
    print_model(doc) if json else console.print(f"revoked {doc.id}")


@endpoint_app.command("show")
def endpoint_show(endpoint_id: str, server: str | None = SERVER,
                  admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """An endpoint's inventory, snapshots and recent transactions."""
    doc = client(server, admin_token_file).endpoint(endpoint_id)
    if json:
        print_model(doc)
        return
    inv = doc.inventory
    hw = inv.get("hardware")
    hw = hw if isinstance(hw, dict) else {}
    cpu = inv.get("cpu")
    cpus = cpu.get("count", "?") if isinstance(cpu, dict) else "?"
    ram = inv.get("ram_bytes", 0)
    console.print(f"[bold]{safe(doc.hostname)}[/] {safe(doc.id)}  state: {safe(doc.state)}  "
                  f"last seen: {_time(doc.last_seen)}", markup=True, highlight=False)
    console.print(f"{inv.get('os_name', doc.os)}; {hw.get('vendor', '')} "
                  f"{hw.get('model', '')}; {cpus} CPUs; "
                  f"{human_bytes(ram if isinstance(ram, int | float) else 0)} RAM",
                  highlight=False)
    if doc.layers:
        layers, state = _layer_cells(doc.layers)
        console.print(f"layers: {layers}; update: {state}; applied: "
                      f"{', '.join(doc.layers.applied) or 'none'}"
                      + (f"\n  {doc.layers.detail}" if doc.layers.detail else ""),
                      highlight=False)
    table = Table("Snapshot", "Time", "Trigger", "Files", "Size", "New")
    for s in doc.snapshot_list:
        table.add_row(s.id[:8], _time(s.time), s.trigger, str(s.files),
                      human_bytes(s.bytes_total), human_bytes(s.bytes_new))
    console.print(table)
    tx = Table("Transaction", "Kind", "Result", "Changed", "Read", "New", "Wire", "Seconds")
    for t in doc.transactions:
        tx.add_row(str(t.id), t.kind, t.result, str(t.files_changed),
                   human_bytes(t.bytes_before_dedup), human_bytes(t.bytes_after_dedup),
                   human_bytes(t.bytes_on_wire), f"{t.seconds:.1f}")
    console.print(tx)


@endpoint_app.command("tag")
def endpoint_tag(endpoint: str, tags: list[str], server: str | None = SERVER,
                 admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Set an endpoint's tags (used by collection rules)."""
    from strata.model.admin import TagsRequest

    from .admin_client import build

    doc = client(server, admin_token_file).set_tags(endpoint, build(TagsRequest, tags=tags))
    print_model(doc) if json else console.print(f"tags: {', '.join(doc.tags)}")


@endpoint_app.command("revert")
def endpoint_revert(endpoint: str, snapshot: str = typer.Option(..., "--snapshot"),
                    keep_user_apps: bool = typer.Option(False, "--keep-user-apps"),
                    keys: Path | None = KEYS, passphrase_file: Path | None = PASSPHRASE_FILE,
                    server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                    json: bool = JSON) -> None:
    """System layers back to a snapshot; the user's data stays as it is now (signed with
    --keys: agents take only a signed revert)."""
    from strata.model.admin import RevertRequest

    from .admin_client import build

    req = build(RevertRequest, snapshot=snapshot, keep_user_apps=keep_user_apps)
    pub = publisher_for(server, admin_token_file, keys, passphrase_file, required=True)
    doc = client(server, admin_token_file).revert(endpoint, req)
    signed = None if pub is None else signed_after("the revert", lambda: pub.sign_operation(
        doc.endpoint, "revert", snapshot=doc.snapshot))
    _done(doc, signed, json, f"revert of {doc.endpoint[:8]} to {doc.snapshot[:8]} assigned")


def _done(doc: BaseModel, signed: int | None, json: bool, text: str) -> None:
    if json:
        print_json({**doc.model_dump(mode="json"), "signed": signed})
    else:
        console.print(text + (f", signed (metadata version {signed})" if signed else ""),
                      highlight=False)


@endpoint_app.command("restore")
def endpoint_restore(endpoint: str, to_endpoint: str = typer.Option(..., "--to-endpoint"),
                     keys: Path | None = KEYS, passphrase_file: Path | None = PASSPHRASE_FILE,
                     server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                     json: bool = JSON) -> None:
    """Full restore of an endpoint's CVD onto new hardware (drivers chosen again); signed
    with --keys."""
    from strata.model.admin import RestoreRequest

    from .admin_client import build

    req = build(RestoreRequest, to_endpoint=to_endpoint)
    pub = publisher_for(server, admin_token_file, keys, passphrase_file, required=True)
    doc = client(server, admin_token_file).restore(endpoint, req)
    signed = None if pub is None else signed_after("the restore", lambda: pub.sign_operation(
        doc.to, "restore", snapshot=doc.snapshot))
    _done(doc, signed, json,
          f"CVD of {doc.from_[:8]} moves to {doc.to[:8]} (snapshot {doc.snapshot[:8]})")


@endpoint_app.command("provision")
def endpoint_provision(endpoint: str, base: str = typer.Option(..., "--base"),
                       app: list[str] | None = typer.Option(None, "--app"),
                       keys: Path | None = KEYS, passphrase_file: Path | None = PASSPHRASE_FILE,
                       server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                       json: bool = JSON) -> None:
    """Wipe an endpoint's system and lay down layers; it then starts a fresh CVD (signed
    with --keys)."""
    from strata.model.admin import ProvisionRequest

    from .admin_client import build

    fields: dict[str, Any] = {"base": layer_ref(base), "apps": layer_refs(app) or []}
    pub = publisher_for(server, admin_token_file, keys, passphrase_file, required=True)
    if pub is not None:
        fields = signable_refs(pub, server, admin_token_file, fields)
    doc = client(server, admin_token_file).provision(endpoint,
                                                     build(ProvisionRequest, **fields))
    signed = None if pub is None else signed_after("the provisioning", lambda: pub.sign_operation(
        doc.endpoint, "provision", base=fields["base"], apps=fields["apps"]))
    _done(doc, signed, json, f"provisioning of {doc.endpoint[:8]} assigned")

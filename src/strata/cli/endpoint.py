"""Endpoint commands (`strata endpoint …`): list, show, approve, revoke, tag, and the
operations on one endpoint (revert, restore onto new hardware, provision)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from strata.errors import StrataError

from .admin_args import JSON, SERVER, TOKEN_FILE, client, layer_ref, layer_refs, print_model
from .confirm import YES, confirm
from .output import console, human_bytes, iso_time, print_json, safe
from .signing import KEYS, PASSPHRASE_FILE, publisher_for, signable_refs, signed_after

if TYPE_CHECKING:
    from pydantic import BaseModel

    from strata.cli.admin_client import AdminClient
    from strata.model.admin import AssignmentStatus, EndpointDetail

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
    return iso_time(when)


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
                    yes: bool = YES, server: str | None = SERVER,
                    admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """System layers back to a snapshot; the user's data stays as it is now (signed with
    --keys: agents take only a signed revert). Asks first (--yes for scripts)."""
    from strata.model.admin import RevertRequest

    from .admin_client import build

    req = build(RevertRequest, snapshot=snapshot, keep_user_apps=keep_user_apps)
    _confirm_revert(client(server, admin_token_file), endpoint, snapshot, keep_user_apps, yes)
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
                     whole: bool = typer.Option(False, "--whole", help="Download it all "
                                                "first and switch at the next restart, "
                                                "instead of the boot set first."),
                     keys: Path | None = KEYS, passphrase_file: Path | None = PASSPHRASE_FILE,
                     yes: bool = YES, server: str | None = SERVER,
                     admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Full restore of an endpoint's CVD onto new hardware (drivers chosen again); signed
    with --keys. Pipelined: the files it reads at boot and login first (usable then), the
    rest while the user works. Asks first: the new machine's own files are replaced
    (--yes for scripts)."""
    from strata.model.admin import RestoreRequest

    from .admin_client import build

    req = build(RestoreRequest, to_endpoint=to_endpoint, pipelined=not whole)
    _confirm_restore(client(server, admin_token_file), endpoint, to_endpoint, yes)
    pub = publisher_for(server, admin_token_file, keys, passphrase_file, required=True)
    doc = client(server, admin_token_file).restore(endpoint, req)
    signed = None if pub is None else signed_after("the restore", lambda: pub.sign_operation(
        doc.to, "restore", snapshot=doc.snapshot))
    order = (f"; boot set of {doc.boot_set} file(s) first, then {doc.working_set} of the "
             "working set, then the rest" if doc.boot_set else
             "; no boot set learned: the system first, then user data") \
        if doc.pipelined else "; whole, at the next restart"
    _done(doc, signed, json,
          f"CVD of {doc.from_[:8]} moves to {doc.to[:8]} (snapshot {doc.snapshot[:8]})"
          + order
          + (f"; all of its own files come along, the {doc.own_do_not_download} that match "
             "the do-not-download rule too (that rule applies to layers)"
             if doc.own_do_not_download else ""))


@endpoint_app.command("provision")
def endpoint_provision(endpoint: str, base: str = typer.Option(..., "--base"),
                       app: list[str] | None = typer.Option(None, "--app"),
                       keys: Path | None = KEYS, passphrase_file: Path | None = PASSPHRASE_FILE,
                       yes: bool = YES, server: str | None = SERVER,
                       admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Wipe an endpoint's system and lay down layers; it then starts a fresh CVD (signed
    with --keys). Asks first: user data is wiped too (--yes for scripts)."""
    from strata.model.admin import ProvisionRequest

    from .admin_client import build

    fields: dict[str, Any] = {"base": layer_ref(base), "apps": layer_refs(app) or []}
    _confirm_provision(client(server, admin_token_file), endpoint, yes)
    pub = publisher_for(server, admin_token_file, keys, passphrase_file, required=True)
    if pub is not None:
        fields = signable_refs(pub, server, admin_token_file, fields)
    doc = client(server, admin_token_file).provision(endpoint,
                                                     build(ProvisionRequest, **fields))
    signed = None if pub is None else signed_after("the provisioning", lambda: pub.sign_operation(
        doc.endpoint, "provision", base=fields["base"], apps=fields["apps"]))
    _done(doc, signed, json, f"provisioning of {doc.endpoint[:8]} assigned")


# -- what an operation on an endpoint loses, asked before it is assigned ----------------------


def _who(ep: EndpointDetail) -> str:
    return f"{ep.hostname} ({ep.id[:8]})"


def _latest(ep: EndpointDetail) -> str:
    if not ep.snapshot_list:
        return f"{_who(ep)} has no snapshot on the server: what is on it now is lost for good"
    s = ep.snapshot_list[-1]
    return (f"its latest snapshot {s.id[:8]} ({_time(s.time)}, {s.files} files, "
            f"{human_bytes(s.bytes_total)}) stays on the server; the agent also takes a "
            "pre-update snapshot before it applies")


def _confirm_revert(api: AdminClient, ref: str, snapshot: str, keep_user_apps: bool,
                    yes: bool) -> None:
    if yes:
        return
    ep = api.endpoint(ref)
    if snapshot in ("", "latest"):
        target = ep.snapshot_list[-1] if ep.snapshot_list else None
    else:
        found = [s for s in ep.snapshot_list if s.id.startswith(snapshot.lower())]
        if len(found) > 1:
            raise StrataError(f"snapshot {snapshot!r} is ambiguous: give more characters")
        target = found[0] if found else None
    if target is None:  # before asking about it
        raise StrataError(f"endpoint {_who(ep)} has no snapshot {snapshot!r} (`strata "
                          f"endpoint show {ep.id[:8]}` lists them)")
    confirm(f"revert {_who(ep)} to snapshot {target.id[:8]} of {_time(target.time)}", [
        "system files and configuration go back to that snapshot: changes made since are "
        "replaced",
        "applications the user installed since are kept (--keep-user-apps)" if keep_user_apps
        else "applications the user installed and files added under system paths since "
             "are deleted (--keep-user-apps keeps them)",
        "user data and identity stay as they are now",
        _latest(ep)], yes=yes)


def _confirm_restore(api: AdminClient, ref: str, to: str, yes: bool) -> None:
    if yes:
        return
    old, new = api.endpoint(ref), api.endpoint(to)
    confirm(f"restore the CVD of {_who(old)} onto {_who(new)}", [
        f"everything on {_who(new)} but what is never centralized is replaced by the CVD "
        f"of {_who(old)}, user data included",
        _latest(new),
        f"{_who(old)} is revoked and its CVD moves to the new machine"], yes=yes)


def _confirm_provision(api: AdminClient, ref: str, yes: bool) -> None:
    if yes:
        return
    ep = api.endpoint(ref)
    confirm(f"provision {_who(ep)}", [
        "everything on it but its identity is wiped: system, applications, user data and "
        "home directories", _latest(ep), "it then starts a fresh CVD"], yes=yes)


@endpoint_app.command("delete")
def endpoint_delete(endpoint: str, yes: bool = YES, server: str | None = SERVER,
                    admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Delete an endpoint and its CVD (e.g. the orphan a re-enrollment leaves): every
    snapshot of it goes, and its credential stops working. Asks first (--yes for
    scripts)."""
    api = client(server, admin_token_file)
    if not yes:
        ep = api.endpoint(endpoint)
        latest = ep.snapshot_list[-1] if ep.snapshot_list else None
        confirm(f"delete endpoint {_who(ep)} and its CVD", [
            f"state {ep.state}, last seen {_time(ep.last_seen) or 'never'}",
            f"{len(ep.snapshot_list)} snapshots"
            + (f", the latest {latest.id[:8]} of {_time(latest.time)}" if latest else "")
            + ": all are deleted (their data is freed at the next maintenance)",
            "its agent's credential stops working"], yes=yes)
    doc = api.delete_endpoint(endpoint)
    print_model(doc) if json else console.print(
        f"deleted endpoint {doc.deleted} ({doc.hostname}) and {doc.snapshots} snapshots",
        highlight=False)
# -- an endpoint's snapshots: browse, export, mount -----------------------------------------

SNAPSHOT = typer.Option("latest", "--snapshot", help="Snapshot id, unique prefix, or latest.")


@endpoint_app.command("files")
def endpoint_files(endpoint: str,
                   path: str = typer.Argument("", help="A folder (or file) of the snapshot; "
                                              "its root by default."),
                   snapshot: str = SNAPSHOT, server: str | None = SERVER,
                   admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """List a folder of one of the endpoint's snapshots."""
    from strata.model.snapshot_files import MAX_LISTED

    c = client(server, admin_token_file)
    page = c.snapshot_files(endpoint, snapshot, path, 0, MAX_LISTED)
    entries = list(page.entries)
    while page.truncated:
        page = c.snapshot_files(endpoint, page.snapshot, path, len(entries), MAX_LISTED)
        entries.extend(page.entries)
    if json:
        print_json({**page.model_dump(mode="json", exclude={"entries", "offset", "truncated"}),
                    "entries": [e.model_dump(mode="json") for e in entries]})
        return
    console.print(f"{page.snapshot[:8]}:/{page.path}", markup=False, highlight=False)
    kinds = {"dir": "d", "symlink": "l", "fifo": "p", "chardev": "c", "blockdev": "b"}
    for e in entries:
        bits = int(e.mode, 8)
        mode = kinds.get(e.type, "-") + "".join(
            ch if bits & (1 << (8 - i)) else "-" for i, ch in enumerate("rwxrwxrwx"))
        name = e.name + ("/" if e.type == "dir" else "")
        if e.link_target is not None:
            name += " -> " + e.link_target
        console.print(f"{mode} {e.uid:>5} {e.gid:>5} {e.size:>12} "
                      f"{iso_time(e.mtime)} {name}",
                      markup=False, highlight=False)
    console.print(f"{len(entries)} entries", highlight=False)


def _may_overwrite(what: str, yes: bool) -> None:
    """Ask before replacing `what`; without a terminal, only --yes does."""
    confirm(f"{what} already exists: overwrite it", [], yes=yes)


@endpoint_app.command("export")
def endpoint_export(endpoint: str,
                    snapshot: str = typer.Option(..., "--snapshot",
                                                 help="Snapshot id, prefix, or latest."),
                    to: Path = typer.Option(..., "--to", help="A folder, or FILE.tar / "
                                            "FILE.zip for an archive."),
                    path: str = typer.Option("", "--path", help="Only this folder or file."),
                    yes: bool = typer.Option(False, "--yes", help="Overwrite without asking."),
                    server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                    json: bool = JSON) -> None:
    """Export a snapshot (or one folder of it) into a folder or a tar/zip file."""
    from strata.engine.restore import restore as run_restore

    from .output import err_console, restore_totals, run_with_progress
    from .snapshot_source import AdminSnapshotSource

    archive = to.suffix.lower() in (".tar", ".zip")
    if archive and to.exists():
        _may_overwrite(str(to), yes)
    elif not archive and to.exists() and (not to.is_dir() or any(to.iterdir())):
        _may_overwrite(f"{to} (not an empty folder)", yes)
    with AdminSnapshotSource(client(server, admin_token_file), endpoint, snapshot) as src:
        if archive:
            size = src.download(path, to.suffix.lower()[1:], to)
            if json:
                print_json({"to": str(to), "bytes": size})
            else:
                console.print(f"wrote {to} ({human_bytes(size)})", markup=False,
                              highlight=False)
            return
        snap = src.snapshot()
        includes = [path] if path.strip("/") else []
        result = run_with_progress("export", lambda p: run_restore(
            src, snap, to, includes=includes or None, progress=p),  # type: ignore[arg-type]
            counter=lambda p: restore_totals(src, snap, includes, p), json_mode=json)
    if json:
        print_json(result.to_dict())
    else:
        for e in result.errors:
            err_console.print(f"error: {e}", markup=False, highlight=False)
        console.print(f"exported {result.files} files, {result.dirs} dirs "
                      f"({human_bytes(result.bytes_written)}) of {snap.id[:8]} into {to}"
                      + (f"; {len(result.errors)} skipped" if result.errors else ""),
                      markup=False, highlight=False)
    if result.errors:
        raise typer.Exit(1)


@endpoint_app.command("mount")
def endpoint_mount(endpoint: str,
                   mountpoint: str = typer.Argument(..., help="An existing, empty folder."),
                   snapshot: str = SNAPSHOT,
                   cache_size: str = typer.Option("64MiB", help="Chunks kept in memory."),
                   allow_other: bool = typer.Option(
                       False, "--allow-other", help="Let other users read the mount too, as "
                       "the snapshot's modes and owners allow."),
                   server: str | None = SERVER,
                   admin_token_file: Path | None = TOKEN_FILE) -> None:
    """Mount one of the endpoint's snapshots read-only (FUSE), reading through the
    server; runs until unmounted or Ctrl-C."""
    from strata.engine.snapshot_tree import SnapshotTree, snapshot_mtime_ns

    from .mount import preflight, serve_mount
    from .snapshot_source import AdminSnapshotSource
    from .store import parse_size

    cache = parse_size(cache_size)
    preflight(mountpoint)
    with AdminSnapshotSource(client(server, admin_token_file), endpoint, snapshot) as src:
        snap = src.snapshot()
        tree = SnapshotTree(snap.manifest, src.load_chunks, cache_bytes=cache,
                            mtime_ns=snapshot_mtime_ns(snap.time))
        serve_mount(tree, mountpoint, f"snapshot {snap.id[:8]} of {endpoint}",
                    f"strata:{snap.id[:8]}", allow_other)

"""`strata agent …`: enroll an endpoint and keep it centralized."""

from __future__ import annotations

import socket
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from strata.agent.state import AgentState, Credential, default_root, default_state_dir
from strata.agent.throttle import parse_rate
from strata.errors import StrataError

if TYPE_CHECKING:
    from strata.agent.client import ServerClient
    from strata.model.wire import CheckinResponse

# The HTTP client and the wire schemas are imported inside the commands that use them,
# so `strata store …` does not pay for them at start-up.

from .output import console, err_console, human_bytes, print_json, run_with_progress

app = typer.Typer(help="The endpoint agent.", no_args_is_help=True)
STATE = typer.Option(None, "--state", help="Agent state directory (credential, caches).")
JSON = typer.Option(False, "--json", help="Print JSON.")
LIMIT_UP = typer.Option(None, "--limit-upload", help="Upload cap, e.g. 512K or 2M "
                        "(bytes per second).")


def _state(state: Path | None) -> AgentState:
    return AgentState(state or default_state_dir())


def _client(cred: Credential, limit_upload: str | None = None) -> ServerClient:
    from strata.agent.client import ServerClient

    try:
        rate = parse_rate(limit_upload)
    except ValueError as exc:
        raise StrataError(str(exc)) from None
    return ServerClient(cred.server, cred.credential, upload_rate=rate, verify=cred.verify)


def _apply_limits(client: ServerClient, policy_bw: dict, local_up: str | None) -> None:
    up = policy_bw.get("upload_kbps")
    down = policy_bw.get("download_kbps")
    local = parse_rate(local_up)
    rates = [r for r in (up * 1024 if up else None, local) if r]
    client.set_limits(min(rates) if rates else None, down * 1024 if down else None)


@app.command()
def enroll(server: str = typer.Option(..., "--server", envvar="STRATA_SERVER"),
           token: str = typer.Option(..., "--token", help="Enrollment token from the admin."),
           root: Path = typer.Option(None, "--root", help="The endpoint's root (default /)."),
           ca_cert: Path | None = typer.Option(None, "--ca-cert", help="CA bundle to trust "
                                               "for a server with a private certificate."),
           state: Path | None = STATE, json: bool = JSON) -> None:
    """Enroll this endpoint with a one-time token; stores the device credential (0600)."""
    from strata.agent.client import ServerClient
    from strata.agent.inventory import collect_inventory

    st = _state(state)
    root = (root or default_root()).resolve()
    if not root.is_dir():
        raise StrataError(f"root {root} is not a directory")
    inv = collect_inventory(root, st.path / "hardware.json")
    ca = str(ca_cert.resolve()) if ca_cert else ""
    client = ServerClient(server, retries=2, verify=ca or True)
    try:
        resp = client.request("POST", "/api/v1/agent/enroll", json={
            "token": token, "hostname": inv["hostname"] or socket.gethostname(),
            "os": inv["os"], "inventory": inv}).json()
    finally:
        client.close()
    st.save_credential(Credential(server=server, endpoint_id=resp["endpoint_id"],
                                  credential=resp["credential"], root=str(root), ca_cert=ca))
    st.add_wire_bytes(client.bytes_sent, client.bytes_received)
    if json:
        print_json({"endpoint_id": resp["endpoint_id"], "state": resp["state"]})
    else:
        note = " (waiting for an administrator's approval)" if resp["state"] == "pending" else ""
        console.print(f"enrolled as {resp['endpoint_id']}{note}")


def _cycle(st: AgentState, cred: Credential, *, force: bool, trigger: str,
           limit_upload: str | None, json: bool) -> dict:
    """Check in; centralize if due (or forced). Returns what happened."""
    from strata.agent.centralize import centralize, checkin
    from strata.agent.client import ServerUnreachable

    client = _client(cred, limit_upload)
    root = Path(cred.root)
    try:
        try:
            info = checkin(client, root, st)
        except ServerUnreachable as exc:
            # Offline: decide from what we know locally whether a centralization is owed,
            # so status shows it as pending until the server is back.
            status = st.status()
            interval = (status.get("policy") or {}).get("interval_seconds", 3600)
            last = (status.get("last_centralization") or {}).get("time")
            owed = force or not last or time.time() - _ts(last) >= interval
            st.update_status(server_reachable=False,
                             pending_work=["centralize"] if owed else
                             status.get("pending_work", []))
            return {"checked_in": False, "offline": str(exc)}
        _apply_limits(client, info.policy.bandwidth.model_dump(), limit_upload)
        last = st.status().get("last_centralization") or {}
        due = force or not info.last_snapshot or not last.get("time") or \
            time.time() - _ts(last["time"]) >= info.policy.interval_seconds
        if not due and _enforced(info, st):
            # Enforcement repairs against a fresh snapshot (which also keeps the user's
            # versions): take one now if anything changed since the last.
            from strata.agent.centralize import own_exclusions
            from strata.agent.drift import tree_changed

            due = tree_changed(root, info.policy.exclusions + own_exclusions(root, st),
                               st.parent()[1])
        out: dict = {"checked_in": True, "endpoint_id": info.endpoint_id, "centralized": False}
        if due:
            st.update_status(pending_work=["centralize"])
            try:
                result = run_with_progress(
                    "centralize", lambda p: centralize(client, st, root, info, trigger=trigger,
                                                       progress=p), json_mode=json)
            except ServerUnreachable as exc:
                st.update_status(server_reachable=False, pending_work=["centralize"])
                return {**out, "offline": str(exc)}
            st.update_status(pending_work=[])
            out.update(centralized=True, result=result.to_dict())
        if info.desired is not None:
            from strata.agent.update import on_checkin

            def central(trig: str) -> str:
                return centralize(client, st, root, info, trigger=trig).snapshot
            update = on_checkin(client, st, root, info.desired, central)
            if update is not None:
                out["update"] = update.to_dict()
        return out
    finally:
        st.add_wire_bytes(client.bytes_sent, client.bytes_received)
        client.close()


def _enforced(info: CheckinResponse, st: AgentState) -> bool:
    """An applied layer assignment under enforcement: drift is repaired at check-in."""
    desired = info.desired
    return desired is not None and desired.enforce and desired.key == st.applied_key()


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _report(out: dict, json: bool) -> None:
    if json:
        print_json(out)
        return
    if not out.get("checked_in") or out.get("offline"):
        err_console.print(f"offline: {out.get('offline')}; will retry", highlight=False)
    if out.get("centralized"):
        r = out["result"]
        console.print(f"{r['kind']} {r['snapshot'][:8]}: {r['files']} files, "
                      f"{r['files_changed']} changed, read {human_bytes(r['bytes_read'])}, "
                      f"server lacked {human_bytes(r['bytes_new'])}, sent "
                      f"{human_bytes(r['bytes_sent'])} on the wire in {r['seconds']:.1f}s")
    elif out.get("checked_in"):
        console.print("checked in; nothing due")
    if out.get("update"):
        _report_update(out["update"])


def _report_update(u: dict) -> None:
    c = u.get("changes") or {}
    what = ", ".join(f"{n} {k}" for k, n in c.items() if n) or "no changes"
    conflicts = ", ".join(f"{n} {k}" for k, n in (u.get("conflicts") or {}).items())
    line = {"ready": "layer update ready (restart or `strata agent apply`)",
            "applied": "layer update applied", "repaired": "drift repaired"}.get(
        u["state"], u["state"])
    console.print(f"{line}: {what}; downloaded {human_bytes(u.get('bytes_downloaded', 0))}"
                  + (f"; conflicts: {conflicts}" if conflicts else ""), highlight=False)


@app.command()
def run(once: bool = typer.Option(False, "--once", help="One cycle, then exit."),
        state: Path | None = STATE, limit_upload: str | None = LIMIT_UP,
        poll: float = typer.Option(60, "--poll", help="Seconds between check-ins."),
        json: bool = JSON) -> None:
    """The agent daemon: check in, centralize when due, work offline, resume."""
    st = _state(state)
    cred = st.credential()
    backoff = poll
    while True:
        with st.exclusive():
            out = _cycle(st, cred, force=False, trigger="scheduled", limit_upload=limit_upload,
                         json=json)
        _report(out, json)
        if once:
            return
        backoff = poll if out.get("checked_in") and not out.get("offline") else \
            min(backoff * 2, 3600)
        time.sleep(backoff)


@app.command()
def backup(state: Path | None = STATE, limit_upload: str | None = LIMIT_UP,
           json: bool = JSON) -> None:
    """Centralize now (user-initiated)."""
    st = _state(state)
    with st.exclusive():
        out = _cycle(st, st.credential(), force=True, trigger="user",
                     limit_upload=limit_upload, json=json)
    _report(out, json)
    if out.get("offline"):
        raise typer.Exit(3)


@app.command()
def apply(state: Path | None = STATE, json: bool = JSON) -> None:
    """Apply a downloaded layer update (what a restart does): pre-update snapshot, then
    the switch under a journal. After a power cut, running it again finishes the job."""
    from strata.agent.centralize import centralize, checkin
    from strata.agent.client import ServerUnreachable
    from strata.agent.update import apply_update, recover

    st = _state(state)
    cred = st.credential()
    root = Path(cred.root)
    with st.exclusive():
        recovered = recover(root)
        # A discarded staging, or a switch rolled forward before its result was recorded,
        # leaves the update pending: carry on with it.
        if recovered and st.update().get("state") not in ("ready", "applying", "failed"):
            if json:
                print_json({"recovered": recovered})
            else:
                console.print(f"an interrupted apply was {recovered}")
            return
        client = _client(cred)
        try:
            try:
                info = checkin(client, root, st)
            except ServerUnreachable:
                info = None

            def central(trig: str) -> str:
                assert info is not None
                return centralize(client, st, root, info, trigger=trig).snapshot
            result = apply_update(client if info else None, st, root,
                                  central if info else None)
        finally:
            st.add_wire_bytes(client.bytes_sent, client.bytes_received)
            client.close()
    if json:
        print_json(result.to_dict())
    else:
        _report_update(result.to_dict())


@app.command()
def snapshots(state: Path | None = STATE, json: bool = JSON) -> None:
    """This endpoint's snapshots on the server."""
    st = _state(state)
    client = _client(st.credential())
    try:
        rows = client.request("GET", "/api/v1/agent/snapshots").json()
    finally:
        st.add_wire_bytes(client.bytes_sent, client.bytes_received)
        client.close()
    if json:
        print_json(rows)
        return
    table = Table("ID", "Time", "Trigger", "Files", "Size")
    for r in rows:
        table.add_row(r["id"][:8], r["time"][:19], r["trigger"], str(r["files"]),
                      human_bytes(r["bytes_total"]))
    console.print(table)


@app.command()
def restore(paths: list[str] = typer.Argument(..., help="Paths to restore (relative to the "
                                              "endpoint root, e.g. home/alice/report.txt)."),
            snapshot: str = typer.Option("latest", "--snapshot", help="Snapshot id or prefix."),
            to: Path | None = typer.Option(None, "--to", help="Restore under this directory "
                                           "instead of in place."),
            full_metadata: bool = typer.Option(
                False, "--full-metadata", help="With --to: also restore device nodes, "
                "setuid/setgid bits and security.*/trusted.* xattrs (in place they always "
                "are)."),
            state: Path | None = STATE, json: bool = JSON) -> None:
    """Restore files from any of this endpoint's snapshots."""
    from strata.agent.remote_source import RemoteSource
    from strata.engine.restore import restore as run_restore

    st = _state(state)
    cred = st.credential()
    client = _client(cred)
    try:
        source = RemoteSource(client)
        snap = source.snapshot(snapshot)
        target = to or Path(cred.root)
        # In place it is the endpoint's own system: everything comes back as it was.
        full = full_metadata or to is None
        result = run_with_progress("restore", lambda p: run_restore(
            source, snap, target, includes=paths, progress=p, full_metadata=full),  # type: ignore[arg-type]
            json_mode=json)
        client.request("POST", "/api/v1/agent/transactions/restore", json={
            "snapshot": snap.id, "files": result.files, "bytes_written": result.bytes_written,
            "seconds": result.seconds, "result": "failed" if result.errors else "ok",
            "error": "; ".join(result.errors)[:2000], "bytes_on_wire": client.bytes_received})
    finally:
        st.add_wire_bytes(client.bytes_sent, client.bytes_received)
        client.close()
    if json:
        print_json(result.to_dict())
    else:
        for w in result.withheld:
            console.print(f"withheld: {w}", markup=False, highlight=False)
        for e in result.errors:
            err_console.print(f"error: {e}", markup=False, highlight=False)
        console.print(f"restored {result.files} files ({human_bytes(result.bytes_written)}) "
                      f"from {snap.id[:8]} into {target}"
                      + (f"; {len(result.errors)} skipped" if result.errors else ""),
                      markup=False, highlight=False)
        if result.withheld:
            console.print("device nodes, setuid/setgid bits and privileged xattrs were left "
                          "out: --full-metadata restores them", highlight=False)
    if result.errors:
        raise typer.Exit(1)


@app.command()
def status(state: Path | None = STATE, json: bool = JSON) -> None:
    """Last centralization, pending work, server reachability and bytes on the wire."""
    from strata.agent.client import ServerClient

    st = _state(state)
    cred = st.credential()
    doc = st.status()
    client = ServerClient(cred.server, cred.credential, retries=0, timeout=5,
                          verify=cred.verify)
    try:
        client.request("GET", "/api/v1/health")
        reachable = True
    except StrataError:
        reachable = False
    finally:
        client.close()
    st.add_wire_bytes(client.bytes_sent, client.bytes_received)
    doc = st.status()
    out = {"endpoint_id": cred.endpoint_id, "server": cred.server, "root": cred.root,
           "server_reachable": reachable,
           "last_centralization": doc.get("last_centralization"),
           "last_checkin": doc.get("last_checkin"),
           "pending_work": doc.get("pending_work", []),
           "bytes_sent": int(doc.get("bytes_sent", 0)),
           "bytes_received": int(doc.get("bytes_received", 0)),
           "layer_update": {k: v for k, v in st.update().items() if k in ("key", "state",
                                                                           "error")},
           "applied_layers_key": st.applied_key()}
    if json:
        print_json(out)
        return
    last = out["last_centralization"] or {}
    console.print(f"endpoint {out['endpoint_id']} on {out['server']} "
                  f"({'reachable' if reachable else 'unreachable'})\n"
                  f"last centralization: {last.get('time', 'never')} {last.get('result', '')}\n"
                  f"pending: {', '.join(out['pending_work']) or 'nothing'}\n"
                  f"layer update: {out['layer_update'].get('state', 'none')}\n"
                  f"on the wire: sent {human_bytes(out['bytes_sent'])}, received "
                  f"{human_bytes(out['bytes_received'])}", highlight=False)

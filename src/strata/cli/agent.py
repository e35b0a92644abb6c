"""`strata agent …`: enroll an endpoint and keep it centralized. Parsing and printing
only; the work is in strata.agent (cycle, daemon, enrollment)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import typer
from rich.table import Table

from strata.agent.state import AgentState, Credential, default_root, default_state_dir
from strata.agent.throttle import parse_rate
from strata.errors import StrataError

if TYPE_CHECKING:
    from strata.agent.client import ServerClient
    from strata.agent.cycle import AgentContext, CycleResult
    from strata.agent.live_compliance import LiveCompliance
    from strata.agent.update import UpdateResult
    from strata.engine.progress import Progress as EngineProgress

# The HTTP client, the engine and the wire schemas are imported inside the commands that
# use them, so `strata store …` does not pay for them at start-up.

from .confirm import YES, confirm
from .output import (
    console,
    err_console,
    human_bytes,
    iso_time,
    print_error,
    print_json,
    restore_totals,
    run_with_progress,
)
from .secrets import read_secret

T = TypeVar("T")
app = typer.Typer(help="The endpoint agent.", no_args_is_help=True)
STATE = typer.Option(None, "--state", help="Agent state directory (credential, caches).")
JSON = typer.Option(False, "--json", help="Print JSON.")
LIMIT_UP = typer.Option(None, "--limit-upload", help="Upload cap: 512K or 2M bytes per "
                        "second, or 20mbit / 512kbps bits per second.")


def _state(state: Path | None) -> AgentState:
    return AgentState(state or default_state_dir())


def _rate(limit_upload: str | None) -> float | None:
    try:
        return parse_rate(limit_upload)
    except ValueError as exc:
        raise StrataError(str(exc)) from None


def _client(cred: Credential, limit_upload: str | None = None) -> ServerClient:
    from strata.agent.access import device_client

    return device_client(cred, upload_rate=_rate(limit_upload))


def _context(state: Path | None, limit_upload: str | None, json: bool) -> AgentContext:
    from strata.agent.cycle import AgentContext

    def with_progress(label: str, work: Callable[[EngineProgress], T]) -> T:
        return run_with_progress(label, work, json_mode=json)
    return AgentContext.load(_state(state), upload_rate=_rate(limit_upload),
                             with_progress=with_progress)


@app.command()
def enroll(server: str = typer.Option(..., "--server", envvar="STRATA_SERVER"),
           token: str | None = typer.Option(None, "--token", help="Enrollment token from the "
                                            "admin (visible to other users in `ps`: prefer "
                                            "--token-file, or type it at the prompt)."),
           token_file: Path | None = typer.Option(None, "--token-file", help="File holding "
                                                  "the enrollment token."),
           root: Path = typer.Option(None, "--root", help="The endpoint's root (default /)."),
           ca_cert: Path | None = typer.Option(None, "--ca-cert", help="CA bundle to trust "
                                               "for a server with a private certificate."),
           server_fingerprint: str | None = typer.Option(
               None, "--server-fingerprint", envvar="STRATA_SERVER_FINGERPRINT",
               help="SHA-256 fingerprint of the server's TLS certificate, as `strata server` "
               "printed it: checked now, then the only certificate this agent accepts."),
           insecure: bool = typer.Option(False, "--insecure", help="Allow plain http:// to "
                                         "another machine (secrets cross in clear)."),
           force: bool = typer.Option(False, "--force", help="Enroll anew a state directory "
                                      "that is already enrolled (a new endpoint)."),
           root_fingerprint: str | None = typer.Option(
               None, "--root-fingerprint", help="The signing root's fingerprint `strata "
               "signing init` printed: enrollment stops if the server's differs."),
           one_file_system: bool | None = typer.Option(
               None, "--one-file-system/--cross-file-systems", help="Whether backups stay "
               "on the root's file system (mounts inside it kept empty). Default: stay, "
               "when the root is /."),
           state: Path | None = STATE, json: bool = JSON) -> None:
    """Enroll this endpoint with a one-time token; stores the device credential (0600) and
    pins the server's signing root (layers are taken only when signed under it)."""
    from strata.agent.enrollment import enroll as run_enroll

    secret = read_secret(token, token_file, env="STRATA_ENROLL_TOKEN",
                         what="enrollment token", prompt="Enrollment token")
    done = run_enroll(_state(state), server=server, token=secret,
                      root=root or default_root(),
                      ca_cert=str(ca_cert.resolve()) if ca_cert else "", force=force,
                      root_fingerprint=root_fingerprint, one_file_system=one_file_system,
                      server_fingerprint=server_fingerprint, insecure=insecure)
    if json:
        print_json(done.to_dict())
        return
    note = " (waiting for an administrator's approval)" if done.state == "pending" else ""
    console.print(f"enrolled as {done.endpoint_id}{note}", highlight=False)
    if done.signing_root is None:
        err_console.print("note: the server has no layer signing set up: this agent refuses "
                          "layers until it pins a signing root (`strata agent trust-root "
                          "--fingerprint FP`)", highlight=False)
    if done.replaced:
        console.print(f"this state directory was endpoint {done.replaced}: it stays on the "
                      f"server until an administrator revokes or deletes it "
                      f"(`strata endpoint delete {done.replaced}`)", highlight=False)


@app.command()
def site(name: str | None = typer.Argument(None, help="The site, e.g. lyon (letters, "
                                           "digits, '.', '_', '-')."),
         clear: bool = typer.Option(False, "--clear", help="This endpoint has no site."),
         state: Path | None = STATE, json: bool = JSON) -> None:
    """Show or set the site this endpoint reports at check-in (the server's bandwidth
    rules match on it, as on its subnet)."""
    from strata.agent.location import read_site, write_site

    st = _state(state)
    if clear or name is not None:
        write_site(st.path, None if clear else name)
    current = read_site(st.path)
    if json:
        print_json({"site": current})
    else:
        console.print(current or "(no site)", markup=False, highlight=False)


def _report(out: CycleResult, json: bool) -> None:
    from strata.agent.access import Access

    if json:
        print_json(out.to_dict())
        return
    if out.recovered:
        console.print(f"an interrupted apply was {out.recovered}", highlight=False)
    if out.access is Access.UNREACHABLE:
        err_console.print(f"offline: {out.message}; will retry", highlight=False)
    elif out.access is Access.PENDING:
        err_console.print(f"endpoint {out.endpoint_id} is {out.message}; will check in again",
                          highlight=False)
    elif out.access is not Access.OK:
        print_error(out.message)
    r = out.centralization
    if r is not None:
        console.print(f"{r.kind} {r.snapshot[:8]}: {r.files} files, {r.files_changed} changed, "
                      f"read {human_bytes(r.bytes_read)}, server lacked "
                      f"{human_bytes(r.bytes_new)}, sent {human_bytes(r.bytes_sent)} on the "
                      f"wire in {r.seconds:.1f}s", highlight=False)
        for e in r.errors:
            err_console.print(f"skipped: {e}", highlight=False)
        for m in r.mounts_skipped:
            console.print(f"not crossed into another file system: {m}", markup=False,
                          highlight=False)
    elif out.checked_in and out.access is Access.OK:
        console.print("checked in; nothing due")
    if out.update is not None:
        _report_update(out.update)
    if out.compliance is not None and out.compliance.report.drift:
        _report_compliance(out.compliance, paths=False)
    if out.compliance_error:
        err_console.print(out.compliance_error, markup=False, highlight=False)
    if out.error:
        print_error(out.error)


def _report_compliance(live: LiveCompliance, *, paths: bool) -> None:
    r = live.report
    console.print(f"compliance of the live tree at {iso_time(live.measured_at)}: {r.score}% "
                  f"({len(r.changed)} changed, {len(r.missing)} missing, {len(r.added)} "
                  f"added of {r.managed} managed paths)", highlight=False)
    if paths:
        for kind, items in (("changed", r.changed), ("missing", r.missing),
                            ("added", r.added)):
            for p in items:
                console.print(f"  {kind}: {p}", markup=False, highlight=False)


@app.command("trust-root")
def trust_root(fingerprint: str = typer.Option(..., "--fingerprint", help="The root "
                                               "fingerprint `strata signing init` printed."),
               state: Path | None = STATE, json: bool = JSON) -> None:
    """Pin the server's signing root on an endpoint enrolled before signing was set up
    (or whose root IT replaced): only a root with this fingerprint is accepted."""
    from strata.agent.signing import fetch_root, pin

    st = _state(state)
    client = _client(st.credential())
    try:
        root = fetch_root(client)
    finally:
        st.add_wire_bytes(client.bytes_sent, client.bytes_received)
        client.close()
    if root is None:
        raise StrataError("the server has no signing root: run `strata signing init` first")
    pinned = pin(st, root, fingerprint)
    print_json({"signing_root": pinned}) if json else console.print(
        f"pinned signing root {pinned}", highlight=False)


@app.command("trust-server")
def trust_server(server: str | None = typer.Option(None, "--server", help="The server's new "
                                                   "URL (e.g. https:// after an upgrade)."),
                 server_fingerprint: str | None = typer.Option(
                     None, "--server-fingerprint", help="Pin the server's (renewed) "
                     "certificate: its SHA-256 fingerprint, as `strata server` printed it."),
                 ca_cert: Path | None = typer.Option(None, "--ca-cert", help="Trust the "
                                                     "server's certificate through this CA."),
                 insecure: bool = typer.Option(False, "--insecure", help="Allow plain "
                                               "http:// to another machine."),
                 state: Path | None = STATE, json: bool = JSON) -> None:
    """Trust the server anew without enrolling again: a renewed certificate, a CA, or a new
    URL. The server must accept this endpoint's credential over the new connection before
    anything is changed."""
    from strata.agent.enrollment import trust_server as run_trust

    cred = run_trust(_state(state), server=server, server_fingerprint=server_fingerprint,
                     ca_cert=str(ca_cert.resolve()) if ca_cert else "", insecure=insecure)
    print_json({"server": cred.server, "server_trust": cred.server_trust}) if json else \
        console.print(f"{cred.server}: {cred.server_trust}", highlight=False)


def _report_update(u: UpdateResult) -> None:
    if u.state == "refused":
        err_console.print(f"layer update refused: {u.error}", highlight=False)
        return
    what = ", ".join(f"{n} {k}" for k, n in u.changes.items() if n) or "no changes"
    conflicts = ", ".join(f"{n} {k}" for k, n in u.conflicts.items())
    line = {"ready": "layer update ready (restart or `strata agent apply`)",
            "applied": "layer update applied", "repaired": "drift repaired"}.get(
        u.state, u.state)
    console.print(f"{line}: {what}; downloaded {human_bytes(u.bytes_downloaded)}"
                  + (f"; conflicts: {conflicts}" if conflicts else ""), highlight=False)
    for c in u.conflict_list:
        console.print(f"  {c['kind']}: {c['path']} ({c['detail']})", markup=False,
                      highlight=False)
    listed = sum(u.conflicts.values()) - len(u.conflict_list)
    if u.conflict_list and listed > 0:
        console.print(f"  … and {listed} more", highlight=False)


@app.command()
def run(once: bool = typer.Option(False, "--once", help="One cycle, then exit."),
        state: Path | None = STATE, limit_upload: str | None = LIMIT_UP,
        poll: float = typer.Option(60, "--poll", min=0.1, help="Seconds between check-ins."),
        json: bool = JSON) -> None:
    """The agent daemon: check in, centralize when due, work offline, resume; wait for
    approval; stop if the endpoint's access is revoked. Exit codes: see README."""
    from strata.agent.cycle import run_cycle
    from strata.agent.daemon import run_daemon

    ctx = _context(state, limit_upload, json)
    if once:
        out = run_cycle(ctx)
        _report(out, json)
        raise typer.Exit(out.exit_code)
    last = run_daemon(ctx, poll=poll, on_cycle=lambda r: _report(r, json),
                      on_error=lambda exc: print_error(str(exc)))
    raise typer.Exit(last.exit_code if last is not None else 0)


@app.command()
def backup(state: Path | None = STATE, limit_upload: str | None = LIMIT_UP,
           json: bool = JSON) -> None:
    """Centralize now (user-initiated)."""
    from strata.agent.cycle import run_cycle

    out = run_cycle(_context(state, limit_upload, json), force=True, trigger="user")
    _report(out, json)
    raise typer.Exit(out.exit_code)


@app.command()
def apply(state: Path | None = STATE, json: bool = JSON) -> None:
    """Apply a downloaded layer update (what a restart does): pre-update snapshot, then
    the switch under a journal. After a power cut, running it again finishes the job.
    With nothing to apply it says so and exits 0."""
    from strata.agent.cycle import apply_now

    done = apply_now(_context(state, None, json))
    if json:
        print_json(done.to_dict())
        return
    if done.recovered:
        console.print(f"an interrupted apply was {done.recovered}", highlight=False)
    if done.update is not None:
        _report_update(done.update)
    else:
        console.print("nothing to apply" + (f": {done.note}" if done.note else ""),
                      highlight=False)


@app.command()
def compliance(state: Path | None = STATE, json: bool = JSON) -> None:
    """Measure this endpoint's live tree against the IT layers applied on it now (a
    stat-only walk; only files changed since the last snapshot are read) and report it to
    the server. Exit code 1 when anything drifts."""
    from strata.agent.cycle import compliance_now

    live = compliance_now(_context(state, None, json))
    if live is None:
        print_json({"state": "no layers applied"}) if json else console.print(
            "no IT layers are applied on this endpoint: nothing to measure")
        return
    if json:
        print_json(live.to_dict())
    else:
        _report_compliance(live, paths=True)
    if live.report.drift:
        raise typer.Exit(1)


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
        table.add_row(r["id"][:8], iso_time(r["time"]), r["trigger"], str(r["files"]),
                      human_bytes(r["bytes_total"]))
    console.print(table)


@app.command()
def restore(paths: list[str] = typer.Argument(..., help="Paths to restore (relative to the "
                                              "endpoint root, e.g. home/alice/report.txt)."),
            snapshot: str | None = typer.Option(None, "--snapshot", help="Snapshot id or "
                                                "prefix (default: the latest, or during a "
                                                "pipelined restore the one it lays down)."),
            to: Path | None = typer.Option(None, "--to", help="Restore under this directory "
                                           "instead of in place."),
            full_metadata: bool = typer.Option(
                False, "--full-metadata", help="With --to: also restore device nodes, "
                "setuid/setgid bits and security.*/trusted.* xattrs (in place they always "
                "are)."),
            yes: bool = YES, state: Path | None = STATE, json: bool = JSON) -> None:
    """Restore files from any of this endpoint's snapshots. In place, every local file
    that differs from the snapshot's version is kept beside it (NAME.strata-TIME) after a
    confirmation (--yes for scripts)."""
    from strata.agent.cycle import last_bandwidth
    from strata.agent.pipeline import restoring_snapshot
    from strata.agent.reflector_source import ReflectorFetcher
    from strata.agent.remote_source import RemoteSource
    from strata.engine.restore import restore as run_restore
    from strata.engine.restore_inplace import (
        Kept,
        displaced_by,
        keep_aside,
        kept_suffix,
        put_back_failed,
    )

    st = _state(state)
    cred = st.credential()
    # A file that a pipelined restore has not laid down yet comes from that restore's
    # snapshot at once (the restore then finds it in place).
    snapshot = snapshot or restoring_snapshot(st.path) or "latest"
    client = _client(cred)
    client.follow(last_bandwidth(st))  # the caps of the last check-in, by the local clock
    # Chunks from the branch reflector the last check-in named, the server for the rest.
    reflectors = ReflectorFetcher.for_state(client, st)
    try:
        source = RemoteSource(client, reflectors)
        snap = source.snapshot(snapshot)
        target = to or Path(cred.root)
        # In place it is the endpoint's own system: everything comes back as it was.
        full = full_metadata or to is None
        kept: list[Kept] = []
        if to is None:
            displaced = displaced_by(source, snap, target, paths)  # type: ignore[arg-type]
            if displaced:
                confirm(f"restoring in place replaces {len(displaced)} local "
                        f"{'path' if len(displaced) == 1 else 'paths'} that differ from "
                        f"snapshot {snap.id[:8]} (each is kept beside it as "
                        "NAME.strata-TIME)", [d.describe() for d in displaced], yes=yes)
                kept = keep_aside(target, displaced, kept_suffix())
        result = run_with_progress("restore", lambda p: run_restore(
            source, snap, target, includes=paths, progress=p, full_metadata=full),  # type: ignore[arg-type]
            counter=lambda p: restore_totals(source, snap, paths, p),
            json_mode=json)
        kept = put_back_failed(target, kept)
        client.request("POST", "/api/v1/agent/transactions/restore", json={
            "snapshot": snap.id, "files": result.files, "bytes_written": result.bytes_written,
            "seconds": result.seconds, "result": "failed" if result.errors else "ok",
            "error": "; ".join(result.errors)[:2000], "bytes_on_wire": client.bytes_received})
    finally:
        st.add_wire_bytes(client.bytes_sent, client.bytes_received)
        client.close()
        if reflectors is not None:
            reflectors.close()
    if json:
        print_json({**result.to_dict(), "kept": [k.to_dict() for k in kept],
                    # what crossed to the server (the WAN) and what the branch served
                    "bytes_from_server": client.bytes_received,
                    "reflector": reflectors.summary() if reflectors is not None else {}})
    else:
        for k in kept:
            console.print(f"kept the local {k.path.decode(errors='replace')} as "
                          f"{k.kept_as.decode(errors='replace')}" if k.restored else
                          f"left the local {k.path.decode(errors='replace')} as it was "
                          "(its restore failed)", markup=False, highlight=False)
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


@app.command("portal-password")
def portal_password(name: str | None = typer.Option(None, "--name", help="The portal "
                                                    "account (default: the user who runs "
                                                    "this, or who ran sudo)."),
                    home: str = typer.Option("", "--home", help="Your folder in this "
                                             "endpoint's snapshots (default home/NAME, or "
                                             "Users/NAME on Windows): user data only."),
                    password_file: Path | None = typer.Option(
                        None, "--password-file", help="Read the password from this file "
                        "(first line); without it, it is asked for twice."),
                    state: Path | None = STATE, json: bool = JSON) -> None:
    """Set your file portal password (/portal on the server), through this endpoint's
    agent: the account can only read this endpoint's snapshots, in your own folder."""
    import getpass
    import os
    import re

    from strata.agent.client import parse_answer
    from strata.model.roles import USER_NAME
    from strata.model.users import PortalPasswordRequest, PortalPasswordSet

    from .users import read_password

    who = name or os.environ.get("SUDO_USER") or getpass.getuser()
    if not re.fullmatch(USER_NAME, who):  # before asking for a password
        raise StrataError(f"account name {who!r} is not valid: lower-case letters, digits, "
                          "'.', '_' and '-', starting with a letter (give --name)")
    cred = _state(state).credential()
    body = PortalPasswordRequest(name=who, home=home, password=read_password(password_file))
    client = _client(cred)
    try:
        resp = client.request("POST", "/api/v1/agent/portal-password",
                              json=body.model_dump(), retries=1)
        doc = parse_answer(resp, PortalPasswordSet)
    finally:
        client.close()
    if json:
        print_json(doc.model_dump())
    else:
        console.print(f"portal account {doc.name} {'created' if doc.created else 'updated'}:"
                      f" your files in {doc.home}, at {cred.server}/portal",
                      markup=False, highlight=False)


@app.command()
def status(state: Path | None = STATE, json: bool = JSON) -> None:
    """Last centralization, pending work, whether the server lets this endpoint in, and
    bytes on the wire."""
    from strata.agent.access import Access
    from strata.agent.status import read_status

    out = read_status(_context(state, None, json))
    if json:
        print_json(out.to_dict())
        return
    access = {Access.OK: "reachable", Access.UNREACHABLE: "unreachable",
              Access.PENDING: "reachable; waiting for an administrator's approval",
              Access.REVOKED: "reachable; ACCESS REVOKED",
              Access.UNKNOWN: "reachable; CREDENTIAL UNKNOWN TO THE SERVER"}[out.access]
    last = out.last_centralization or {}
    lines = [f"endpoint {out.endpoint_id} on {out.server} ({access})",
             f"server trust: {out.server_trust}",
             f"last centralization: {iso_time(last.get('time')) or 'never'} "
             f"{last.get('result', '')}"]
    if out.access in (Access.REVOKED, Access.UNKNOWN):
        lines.append(out.access_detail)  # instead of pending work it can no longer do
    else:
        lines.append(f"pending: {', '.join(out.pending_work) or 'nothing'}")
    lines.append(f"layer update: {out.layer_update.get('state', 'none')}")
    if out.compliance.get("time"):
        c = out.compliance
        lines.append(f"compliance: {c.get('score')}% of the live tree at "
                     f"{iso_time(c['time'])} ({c.get('drift', 0)} drifted)")
    lines.append(f"on the wire: sent {human_bytes(out.bytes_sent)}, received "
                 f"{human_bytes(out.bytes_received)}")
    if out.restore is not None:
        r = out.restore
        lines.append(f"restore: {r['phase']}, {human_bytes(r['bytes_done'])} of "
                     f"{human_bytes(r['bytes_total'])} in place"
                     + (f"; usable after {r['usable_after_s']} s" if r["usable_after_s"]
                        is not None else "; not usable yet (boot set arriving)")
                     + (f"; complete after {r['complete_after_s']} s"
                        if r["complete_after_s"] is not None else ""))
    console.print("\n".join(lines), highlight=False)


@app.command("install-service")
def install_service(state: Path | None = STATE,
                    root: Path | None = typer.Option(None, "--root", help="Install into "
                                                     "this root (an image, a mounted disk): "
                                                     "ROOT/etc/systemd/system; default /."),
                    unit_dir: Path | None = typer.Option(None, "--unit-dir", help="Write the "
                                                         "units here instead (not enabled)."),
                    strata: str | None = typer.Option(None, "--strata", help="The strata "
                                                      "command the units run (default: this "
                                                      "one)."),
                    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would "
                                                 "be written and run; change nothing."),
                    json: bool = JSON) -> None:
    """Write systemd units for the agent daemon and for the boot-time apply (a downloaded
    update is applied at the next boot, before the display manager), and enable them when
    they go into the system's own unit directory."""
    import shutil
    import sys

    from strata.agent.service import install_service as install
    from strata.agent.service import unit_dir_for

    command = strata or shutil.which("strata") or str(Path(sys.argv[0]).resolve())
    out = install(command, unit_dir=unit_dir_for(root, unit_dir),
                  state=state.resolve() if state is not None else None, dry_run=dry_run)
    if json:
        print_json(out.to_dict())
        return
    for name in out.written or out.units:
        console.print(("would write " if dry_run else "wrote ") + str(Path(out.unit_dir, name)
                                                                      if dry_run else name),
                      markup=False, highlight=False)
    if out.enabled:
        console.print("enabled: " + ", ".join(out.units), markup=False, highlight=False)
    if out.note:
        console.print(out.note, markup=False, highlight=False)

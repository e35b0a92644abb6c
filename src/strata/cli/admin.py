"""Admin commands for credentials and policies (`strata token …`, `strata policy …`):
thin clients of the server's admin API."""

from __future__ import annotations

import json as jsonlib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from strata.errors import StrataError

from .admin_args import JSON, SERVER, TOKEN_FILE, client, print_model
from .confirm import YES, confirm
from .output import console, err_console, iso_time, plural, print_json
from .secrets import write_secret_file

if TYPE_CHECKING:
    from strata.model.admin import PolicyPlan

token_app = typer.Typer(help="Enrollment tokens.", no_args_is_help=True)
admin_token_app = typer.Typer(help="The admin token.", no_args_is_help=True)
policy_app = typer.Typer(help="Upload, retention, bandwidth and layer policies.",
                        no_args_is_help=True)


@token_app.command("create")
def token_create(uses: int = typer.Option(1, "--uses", help="How many enrollments (0 = "
                                          "unlimited)."),
                 expires: str = typer.Option("24h", "--expires", help="e.g. 30m, 24h, 7d; "
                                             "'never' for no expiry."),
                 require_approval: bool = typer.Option(False, "--require-approval"),
                 reflector: bool = typer.Option(False, "--reflector", help="A token that "
                                                "enrolls branch reflectors, not endpoints."),
                 server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                 json: bool = JSON) -> None:
    """Create an enrollment token for agents (or, with --reflector, branch reflectors)."""
    from strata.model.admin import TokenRequest

    from .admin_client import build

    req = build(TokenRequest, uses=uses or None,
                expires=None if expires == "never" else expires,
                require_approval=require_approval,
                purpose="reflector" if reflector else "endpoint")
    doc = client(server, admin_token_file).create_token(req)
    if json:
        print_model(doc)
    else:
        console.print(doc.token, highlight=False)


@token_app.command("list")
def token_list(all_tokens: bool = typer.Option(False, "--all", help="Also expired, used up "
                                               "and revoked tokens."),
               server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
               json: bool = JSON) -> None:
    """Enrollment tokens that still enroll (never the secrets: only their creator saw
    them)."""
    rows = client(server, admin_token_file).tokens(all_tokens)
    if json:
        print_model(rows)
        return
    table = Table("ID", "Created", "Uses left", "Expires", "Approval", "Status", "Enrolled")
    for t in rows:
        table.add_row(str(t.id), _when(t.created_at),
                      "unlimited" if t.uses_left is None else str(t.uses_left),
                      _when(t.expires_at) or "never", "required" if t.require_approval else "",
                      t.status, str(t.enrolled))
    console.print(table)


def _when(value: datetime | None) -> str:
    return iso_time(value)


@token_app.command("revoke")
def token_revoke(token_id: int = typer.Argument(..., help="The id `token list` shows."),
                 server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                 json: bool = JSON) -> None:
    """Stop a token from enrolling anything more (endpoints it enrolled stay)."""
    doc = client(server, admin_token_file).revoke_token(token_id)
    print_model(doc) if json else console.print(
        f"revoked enrollment token {doc.id} ({doc.enrolled} endpoint(s) enrolled with it "
        "stay)", highlight=False)


@admin_token_app.command("rotate")
def admin_token_rotate(server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                       json: bool = JSON) -> None:
    """Replace the admin token: the old one is refused at once. The new one is written to
    --admin-token-file (0600) when one was given, else printed."""
    doc = client(server, admin_token_file).rotate_admin_token()
    if admin_token_file is not None:
        write_secret_file(admin_token_file, doc.token)
    if json:
        print_model(doc.model_copy(update={"token": "(written to the file)"})
                    if admin_token_file is not None else doc)
    elif admin_token_file is not None:
        console.print(f"admin token rotated: the new one is in {admin_token_file} and in "
                      f"{doc.path} on the server; the old one is refused", highlight=False)
    else:
        console.print(doc.token, highlight=False)


POLICY_KIND = typer.Argument(..., help="upload, retention, bandwidth or layers")


@policy_app.command("show")
def policy_show(kind: str = POLICY_KIND, server: str | None = SERVER,
                admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Print a policy document (always JSON; --json is accepted like everywhere), and its
    revision on stderr (for `policy set --revision`)."""
    from strata.model.admin import policy_revision

    doc = client(server, admin_token_file).policy(kind)
    print_json(doc)
    err_console.print(f"policy {kind}, revision {policy_revision(doc)}", markup=False,
                      highlight=False)


def _read_document(file: Path) -> object:
    try:
        text = typer.get_text_stream("stdin").read() if str(file) == "-" else file.read_text()
    except OSError as exc:
        raise StrataError(f"cannot read {file}: {exc.strerror}") from None
    try:
        return jsonlib.loads(text)
    except ValueError as exc:
        raise StrataError(f"{file} is not JSON: {exc}") from None


def _show_plan(plan: PolicyPlan) -> None:
    """The changes, one line each, and what retention would remove per endpoint."""
    at = f" (revision {plan.revision})" if plan.revision else ""
    if not plan.changes:
        console.print(f"policy {plan.kind}{at}: no change", highlight=False)
    else:
        console.print(f"policy {plan.kind}{at}: {plural(len(plan.changes), 'change')}",
                      highlight=False)
    for c in plan.changes:
        if c.before is None:
            line = f"  + {c.key}: {jsonlib.dumps(c.after)}"
        elif c.after is None:
            line = f"  - {c.key}: {jsonlib.dumps(c.before)}"
        else:
            line = f"  ~ {c.key}: {jsonlib.dumps(c.before)} -> {jsonlib.dumps(c.after)}"
        console.print(line, markup=False, highlight=False)


def _losses(plan: PolicyPlan) -> list[str]:
    return [f"{r.endpoint_id} ({r.hostname}): {r.removed} of {plural(r.snapshots, 'snapshot')}"
            + (f", {plural(r.revert_points_removed, 'pre-update revert point')} among them"
               if r.revert_points_removed else "") for r in plan.retention]


REVISION = typer.Option(None, "--revision", help="The revision you reviewed (`policy "
                        "show` and `policy diff` print it): refused if the policy has "
                        "changed since.")
FORCE = typer.Option(False, "--force", help="Store even if someone else changed the "
                     "policy since it was shown or diffed.")


def _check_revision(plan: PolicyPlan, revision: str | None, force: bool) -> str | None:
    """The revision the write must still find (the server checks it as it stores): the
    one given, else the one this plan was made against; none with --force."""
    if force:
        return None
    if revision is not None and revision != plan.revision:
        raise StrataError(f"the {plan.kind} policy changed since revision {revision} (it "
                          f"is now revision {plan.revision}): review it again (strata "
                          f"policy diff {plan.kind} FILE), or overwrite it with --force")
    return plan.revision or None


def _apply_plan(plan: PolicyPlan, *, dry_run: bool, yes: bool, json: bool,
                store: Callable[[], object], ask: str = "") -> None:
    """Show the plan; ask (always when `ask` says what, else only if snapshots would go);
    then `store`, unless it is a dry run or nothing changes."""
    if json and dry_run:
        print_model(plan)
        return
    if not json:
        _show_plan(plan)
    if dry_run:
        for line in _losses(plan):
            console.print(f"  would remove from {line}", markup=False, highlight=False)
        return
    if not plan.changes:
        if json:
            print_json(plan.document)
        return
    if plan.retention:
        total = sum(r.removed for r in plan.retention)
        confirm((f"{ask}: " if ask else "") + f"the next maintenance would remove "
                f"{plural(total, 'snapshot')} from {plural(len(plan.retention), 'endpoint')} "
                "under this retention policy", _losses(plan), yes=yes)
    elif ask:
        confirm(ask, [], yes=yes)
    stored = store()
    if json:
        print_json(stored)
    else:
        console.print(f"stored policy {plan.kind}", highlight=False)


@policy_app.command("set")
def policy_set(kind: str = POLICY_KIND,
               file: Path = typer.Argument(..., help="JSON document ('-' for stdin)."),
               replace: bool = typer.Option(False, "--replace", help="Replace the whole "
                                            "document instead of merging FILE over it."),
               dry_run: bool = typer.Option(False, "--dry-run", help="Show what would "
                                            "change and store nothing."),
               revision: str | None = REVISION, force: bool = FORCE,
               yes: bool = YES, server: str | None = SERVER,
               admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Change a policy: FILE is merged over the current document (objects key by key,
    lists and values replaced), or replaces it with --replace. Shows what changes; a
    retention change that would remove snapshots asks first (--yes for scripts). Refused
    if another administrator changed the policy since the revision shown (--force)."""
    from strata.model.admin import PolicyPlanRequest

    from .admin_client import build

    doc = _read_document(file)
    if not isinstance(doc, dict):
        raise StrataError(f"{file} must hold a JSON object")
    api = client(server, admin_token_file)
    plan = api.plan_policy(kind, build(PolicyPlanRequest, document=doc, replace=replace))
    expected = _check_revision(plan, revision, force)
    _apply_plan(plan, dry_run=dry_run, yes=yes, json=json,
                store=lambda: api.set_policy(kind, plan.document, expected))


@policy_app.command("diff")
def policy_diff(kind: str = POLICY_KIND,
                file: Path = typer.Argument(..., help="JSON document ('-' for stdin)."),
                replace: bool = typer.Option(False, "--replace", help="Compare with FILE "
                                             "as a whole document, not merged."),
                server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                json: bool = JSON) -> None:
    """What `policy set KIND FILE` would change (the same as set --dry-run)."""
    policy_set(kind, file, replace=replace, dry_run=True, revision=None, force=False,
               yes=False, server=server, admin_token_file=admin_token_file, json=json)


@policy_app.command("reset")
def policy_reset(kind: str = POLICY_KIND, dry_run: bool = typer.Option(
                     False, "--dry-run", help="Show what would change and store nothing."),
                 revision: str | None = REVISION, force: bool = FORCE,
                 yes: bool = YES, server: str | None = SERVER,
                 admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Put a policy back to its built-in default, after showing what changes and asking
    (--yes for scripts)."""
    from strata.model.admin import PolicyPlanRequest

    from .admin_client import build

    api = client(server, admin_token_file)
    plan = api.plan_policy(kind, build(PolicyPlanRequest, document=None, replace=True))
    expected = _check_revision(plan, revision, force)
    _apply_plan(plan, dry_run=dry_run, yes=yes, json=json, ask=f"reset policy {kind} to "
                "its default", store=lambda: api.reset_policy(kind, expected))

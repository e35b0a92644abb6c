"""Admin commands for credentials and policies (`strata token …`, `strata policy …`):
thin clients of the server's admin API."""

from __future__ import annotations

import json as jsonlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from strata.errors import StrataError

from .admin_args import JSON, SERVER, TOKEN_FILE, client, print_model
from .confirm import YES, confirm
from .output import console, plural, print_json

if TYPE_CHECKING:
    from strata.model.admin import PolicyPlan

token_app = typer.Typer(help="Enrollment tokens.", no_args_is_help=True)
policy_app = typer.Typer(help="Upload, retention, bandwidth and layer policies.",
                        no_args_is_help=True)


@token_app.command("create")
def token_create(uses: int = typer.Option(1, "--uses", help="How many enrollments (0 = "
                                          "unlimited)."),
                 expires: str = typer.Option("24h", "--expires", help="e.g. 30m, 24h, 7d; "
                                             "'never' for no expiry."),
                 require_approval: bool = typer.Option(False, "--require-approval"),
                 server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                 json: bool = JSON) -> None:
    """Create an enrollment token for agents."""
    from strata.model.admin import TokenRequest

    from .admin_client import build

    req = build(TokenRequest, uses=uses or None,
                expires=None if expires == "never" else expires,
                require_approval=require_approval)
    doc = client(server, admin_token_file).create_token(req)
    if json:
        print_model(doc)
    else:
        console.print(doc.token, highlight=False)


POLICY_KIND = typer.Argument(..., help="upload, retention, bandwidth or layers")


@policy_app.command("show")
def policy_show(kind: str = POLICY_KIND, server: str | None = SERVER,
                admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Print a policy document (always JSON; --json is accepted like everywhere)."""
    print_json(client(server, admin_token_file).policy(kind))


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
    if not plan.changes:
        console.print(f"policy {plan.kind}: no change", highlight=False)
    else:
        console.print(f"policy {plan.kind}: {plural(len(plan.changes), 'change')}",
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
               yes: bool = YES, server: str | None = SERVER,
               admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Change a policy: FILE is merged over the current document (objects key by key,
    lists and values replaced), or replaces it with --replace. Shows what changes; a
    retention change that would remove snapshots asks first (--yes for scripts)."""
    from strata.model.admin import PolicyPlanRequest

    from .admin_client import build

    doc = _read_document(file)
    if not isinstance(doc, dict):
        raise StrataError(f"{file} must hold a JSON object")
    api = client(server, admin_token_file)
    plan = api.plan_policy(kind, build(PolicyPlanRequest, document=doc, replace=replace))
    _apply_plan(plan, dry_run=dry_run, yes=yes, json=json,
                store=lambda: api.set_policy(kind, plan.document))


@policy_app.command("diff")
def policy_diff(kind: str = POLICY_KIND,
                file: Path = typer.Argument(..., help="JSON document ('-' for stdin)."),
                replace: bool = typer.Option(False, "--replace", help="Compare with FILE "
                                             "as a whole document, not merged."),
                server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                json: bool = JSON) -> None:
    """What `policy set KIND FILE` would change (the same as set --dry-run)."""
    policy_set(kind, file, replace=replace, dry_run=True, yes=False, server=server,
               admin_token_file=admin_token_file, json=json)


@policy_app.command("reset")
def policy_reset(kind: str = POLICY_KIND, dry_run: bool = typer.Option(
                     False, "--dry-run", help="Show what would change and store nothing."),
                 yes: bool = YES, server: str | None = SERVER,
                 admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Put a policy back to its built-in default, after showing what changes and asking
    (--yes for scripts)."""
    from strata.model.admin import PolicyPlanRequest

    from .admin_client import build

    api = client(server, admin_token_file)
    plan = api.plan_policy(kind, build(PolicyPlanRequest, document=None, replace=True))
    _apply_plan(plan, dry_run=dry_run, yes=yes, json=json, ask=f"reset policy {kind} to "
                "its default", store=lambda: api.reset_policy(kind))

"""Admin commands for credentials and policies (`strata token …`, `strata policy …`):
thin clients of the server's admin API."""

from __future__ import annotations

import json as jsonlib
from datetime import datetime
from pathlib import Path

import typer
from rich.table import Table

from strata.errors import StrataError

from .admin_args import JSON, SERVER, TOKEN_FILE, client, print_model
from .output import console, print_json
from .secrets import write_secret_file

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
    return value.isoformat(timespec="seconds") if value else ""


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
    """Print a policy document (always JSON; --json is accepted like everywhere)."""
    print_json(client(server, admin_token_file).policy(kind))


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
    print_json(client(server, admin_token_file).set_policy(kind, doc))

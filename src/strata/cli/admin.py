"""Admin commands for credentials and policies (`strata token …`, `strata policy …`):
thin clients of the server's admin API."""

from __future__ import annotations

import json as jsonlib
from pathlib import Path

import typer

from strata.errors import StrataError

from .admin_args import JSON, SERVER, TOKEN_FILE, client, print_model
from .output import console, print_json

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

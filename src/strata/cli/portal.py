"""`strata portal …`: file portal accounts for end users (the help desk sets them up), a
thin client of the admin API."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from strata.errors import StrataError
from strata.model.roles import USER_NAME

from .admin_args import JSON, SERVER, TOKEN_FILE, client, print_model
from .confirm import YES, confirm
from .output import console, iso_time
from .users import PASSWORD_FILE, read_password

portal_app = typer.Typer(help="File portal accounts: an end user reads their own files "
                         "in their endpoint's snapshots at /portal.", no_args_is_help=True)


@portal_app.command("add")
def portal_add(endpoint: str, name: str,
               home: str = typer.Option("", "--home", help="The user's folder in the "
                                        "snapshots (default home/NAME, or Users/NAME on "
                                        "Windows)."),
               password_file: Path | None = PASSWORD_FILE, server: str | None = SERVER,
               admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Give NAME, a user of ENDPOINT, access to their own files."""
    from strata.model.users import PortalAccountRequest

    from .admin_client import build

    if not re.fullmatch(USER_NAME, name):  # before asking for a password
        raise StrataError(f"account name {name!r} is not valid: lower-case letters, digits, "
                          "'.', '_' and '-', starting with a letter")
    req = build(PortalAccountRequest, name=name, home=home,
                password=read_password(password_file))
    doc = client(server, admin_token_file).create_portal_account(endpoint, req)
    if json:
        print_model(doc)
    else:
        console.print(f"portal account {doc.name}: {doc.hostname or doc.endpoint[:8]}, "
                      f"folder {doc.home}")


@portal_app.command("list")
def portal_list(endpoint: str = typer.Option("", "--endpoint", help="Only this one's."),
                server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                json: bool = JSON) -> None:
    rows = client(server, admin_token_file).portal_accounts(endpoint)
    if json:
        print_model(rows)
        return
    from rich.table import Table

    table = Table("Name", "Endpoint", "Hostname", "Folder", "Created")
    for r in rows:
        table.add_row(r.name, r.endpoint[:8], r.hostname, r.home,
                      iso_time(r.created_at))
    console.print(table)


@portal_app.command("delete")
def portal_delete(name: str, yes: bool = YES, server: str | None = SERVER,
                  admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """End an end user's portal access (their sessions end too)."""
    api = client(server, admin_token_file)
    acc = next((a for a in api.portal_accounts() if a.name == name), None)
    if acc is None:
        raise StrataError(f"no portal account {name!r}")
    confirm(f"delete portal account {name}", [
        f"{name} can no longer read {acc.home} of {acc.hostname or acc.endpoint[:8]}"],
        yes=yes)
    doc = api.delete_portal_account(name)
    print_model(doc) if json else console.print(f"deleted portal account {doc.deleted}")

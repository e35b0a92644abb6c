"""`strata user …`: IT staff accounts and their personal API tokens, a thin client of the
admin API's user routes (administrators only)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import typer

from strata.errors import StrataError
from strata.model.roles import ROLE_NAMES, USER_NAME

from .admin_args import JSON, SERVER, TOKEN_FILE, client, print_model
from .confirm import YES, confirm
from .output import console, iso_time

user_app = typer.Typer(help="IT staff accounts (roles: " + ", ".join(ROLE_NAMES) + ").",
                       no_args_is_help=True)
PASSWORD_FILE = typer.Option(None, "--password-file", help="Read the password from this "
                             "file (first line); without it, it is asked for twice.")


def read_password(path: Path | None) -> str:
    if path is not None:
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise StrataError(f"cannot read password file {path}: {exc.strerror}") from None
        if not lines or not lines[0]:
            raise StrataError(f"password file {path} is empty")
        return lines[0]
    if not sys.stdin.isatty():
        raise StrataError("no terminal to ask for the password on: give --password-file")
    import getpass

    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise StrataError("the two passwords differ")
    return first


def _check_role(role: str) -> str:
    if role not in ROLE_NAMES:
        raise StrataError(f"unknown role {role!r}: one of {', '.join(ROLE_NAMES)}")
    return role


@user_app.command("create")
def user_create(name: str,
                role: str = typer.Option(..., "--role", help=" | ".join(ROLE_NAMES)),
                password_file: Path | None = PASSWORD_FILE, server: str | None = SERVER,
                admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Create a user with a role and a console password."""
    from strata.model.users import UserRequest

    from .admin_client import build

    _check_role(role)
    if not re.fullmatch(USER_NAME, name):  # before asking for a password
        raise StrataError(f"user name {name!r} is not valid: lower-case letters, digits, "
                          "'.', '_' and '-', starting with a letter")
    req = build(UserRequest, name=name, role=role, password=read_password(password_file))
    doc = client(server, admin_token_file).create_user(req)
    print_model(doc) if json else console.print(f"created user {doc.name} ({doc.role})")


@user_app.command("list")
def user_list(server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
              json: bool = JSON) -> None:
    """Users, their roles and how many API tokens each holds."""
    rows = client(server, admin_token_file).users()
    if json:
        print_model(rows)
        return
    from rich.table import Table

    table = Table("Name", "Role", "Created", "API tokens")
    for u in rows:
        table.add_row(u.name, u.role, iso_time(u.created_at), str(u.tokens))
    console.print(table)


@user_app.command("delete")
def user_delete(name: str, yes: bool = YES, server: str | None = SERVER,
                admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Delete a user: their console sessions and API tokens stop working at once."""
    api = client(server, admin_token_file)
    user = next((u for u in api.users() if u.name == name), None)
    if user is None:
        raise StrataError(f"no user {name!r}")
    confirm(f"delete user {name} ({user.role})", [
        f"their console sessions and {user.tokens} personal API token(s) stop working"],
        yes=yes)
    doc = api.delete_user(name)
    print_model(doc) if json else console.print(f"deleted user {doc.deleted}")


@user_app.command("passwd")
def user_passwd(name: str, password_file: Path | None = PASSWORD_FILE,
                server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
                json: bool = JSON) -> None:
    """Set a user's password (their console sessions end)."""
    from strata.model.users import PasswordRequest

    from .admin_client import build

    req = build(PasswordRequest, password=read_password(password_file))
    doc = client(server, admin_token_file).set_password(name, req)
    print_model(doc) if json else console.print(f"new password set for {doc.name}")


@user_app.command("role")
def user_role(name: str, role: str = typer.Argument(..., help=" | ".join(ROLE_NAMES)),
              server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
              json: bool = JSON) -> None:
    """Give a user another role (in force at their next request; tokens stay)."""
    from strata.model.users import RoleRequest

    from .admin_client import build

    req = build(RoleRequest, role=_check_role(role))
    doc = client(server, admin_token_file).set_role(name, req)
    print_model(doc) if json else console.print(f"{doc.name} is now {doc.role}")


@user_app.command("token")
def user_token(name: str,
               label: str = typer.Option("", "--label", help="What the token is for."),
               revoke: int | None = typer.Option(None, "--revoke", metavar="ID",
                                                 help="Revoke this token instead."),
               list_: bool = typer.Option(False, "--list", help="List the user's tokens."),
               server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
               json: bool = JSON) -> None:
    """A new personal API token for NAME (printed once: use it as STRATA_ADMIN_TOKEN or
    in --admin-token-file); --list shows them, --revoke ID ends one."""
    api = client(server, admin_token_file)
    if list_ or revoke is not None:
        if revoke is not None:
            api.revoke_user_token(name, revoke)
        rows = api.user_tokens(name)
        if json:
            print_model(rows)
            return
        from rich.table import Table

        table = Table("ID", "Label", "Created", "Last used", "State")
        for t in rows:
            used = iso_time(t.last_used) or "never"
            table.add_row(str(t.id), t.label, iso_time(t.created_at), used,
                          "revoked" if t.revoked else "active")
        console.print(table)
        return
    from strata.model.users import UserTokenRequest

    from .admin_client import build

    doc = api.create_user_token(name, build(UserTokenRequest, label=label))
    print_model(doc) if json else console.print(doc.token, highlight=False)

"""What every admin command shares: the server, token and --json options, and the checks
of layer references, made here first so that a mistake reads as one clear line before
any request is sent."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from strata.errors import StrataError
from strata.model.names import LAYER_NAME, LAYER_VERSION

from .output import print_json

if TYPE_CHECKING:
    from .admin_client import AdminClient

SERVER = typer.Option(None, "--server", envvar="STRATA_SERVER", help="Server URL.")
TOKEN_FILE = typer.Option(None, "--admin-token-file", envvar="STRATA_ADMIN_TOKEN_FILE",
                          help="File with the admin token (or set STRATA_ADMIN_TOKEN to "
                          "the token itself).")
JSON = typer.Option(False, "--json", help="Print JSON.")

NAME_RE, VERSION_RE = re.compile(LAYER_NAME), re.compile(LAYER_VERSION)


def layer_ref(text: str) -> str:
    """A layer reference as the admin typed it: NAME:VERSION (or a numeric id from
    `layer list`). Anything else is refused here, before it can become another URL."""
    if text.isascii() and text.isdigit():
        return text
    name, sep, version = text.partition(":")
    if not sep and NAME_RE.fullmatch(name) and name.strip("."):
        raise StrataError(f"layer {text!r} has no version: give NAME:VERSION, e.g. "
                          f"{name}:1 (`strata layer list` shows the versions)")
    if not (NAME_RE.fullmatch(name) and VERSION_RE.fullmatch(version) and name.strip(".")):
        raise StrataError(f"malformed layer reference {text!r}: expected NAME:VERSION, "
                          "e.g. corp-os:2")
    return text


def layer_refs(texts: list[str] | None) -> list[str] | None:
    return None if texts is None else [layer_ref(t) for t in texts]


def client(server: str | None, token_file: Path | None) -> AdminClient:
    from .admin_client import AdminClient  # imported when a command runs: see its docstring

    return AdminClient(server, token_file)


def print_model(value: object) -> None:
    """`--json` output of an admin command: the API's field names and shapes."""
    from .admin_client import as_json

    print_json(as_json(value))

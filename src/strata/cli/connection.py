"""How every admin command reaches the server: `--ca-cert`, `--server-fingerprint` and
`--insecure`, added to each command that talks to the server (those with an
`--admin-token-file`) in one place, so no command can be left without them."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

import typer


@dataclass
class ConnectionOptions:
    ca_cert: Path | None = None
    server_fingerprint: str | None = None
    insecure: bool = False


# Set by the command being run (one per process), read by AdminClient.
current = ConnectionOptions()

_EXTRA = [
    ("ca_cert", Path | None, typer.Option(
        None, "--ca-cert", envvar="STRATA_CA_CERT",
        help="CA bundle to trust for the server's certificate.")),
    ("server_fingerprint", str | None, typer.Option(
        None, "--server-fingerprint", envvar="STRATA_SERVER_FINGERPRINT",
        help="Trust only the server certificate with this SHA-256 fingerprint (printed "
             "by `strata server`).")),
    ("insecure", bool, typer.Option(
        False, "--insecure", help="Allow plain http:// to another machine (the admin "
                                  "token crosses in clear).")),
]


def talks_to_server(func: Callable[..., Any]) -> bool:
    return "admin_token_file" in inspect.signature(func).parameters


def with_connection_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` with the three options added to its signature (Typer reads that)."""
    sig = inspect.signature(func, eval_str=True)
    hints = get_type_hints(func)

    @functools.wraps(func)
    def command(*args: Any, ca_cert: Path | None = None, server_fingerprint: str | None = None,
                insecure: bool = False, **kwargs: Any) -> Any:
        current.ca_cert, current.server_fingerprint = ca_cert, server_fingerprint
        current.insecure = insecure
        return func(*args, **kwargs)

    params = list(sig.parameters.values())
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                 annotation=kind) for name, kind, default in _EXTRA]
    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {**hints, **{name: kind for name, kind, _ in _EXTRA}}
    command._connection_options = True  # type: ignore[attr-defined]
    return command


def add_connection_options(app: typer.Typer) -> None:
    """Wrap every command of `app` (and of its groups) that talks to the server."""
    for info in app.registered_commands:
        if info.callback is not None and talks_to_server(info.callback) \
                and not getattr(info.callback, "_connection_options", False):
            info.callback = with_connection_options(info.callback)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            add_connection_options(group.typer_instance)

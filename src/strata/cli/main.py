"""The `strata` command: a thin shell over the library."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from importlib import import_module
from typing import Any

import typer

# Typer carries its own copy of click; its exceptions are only reachable here (the
# version is pinned exactly in pyproject.toml).
from typer._click import exceptions as cli_exc

from strata.errors import StrataError

from .connection import add_connection_options
from .output import err_console, print_error

# Each top-level name, the module that defines it, the attribute, and whether it is a
# group of commands. A command line that names one of them imports only that module:
# start-up is most of a quick command's time (0.32 s with every module, 0.26 s with one).
_ENTRIES = [
    ("store", "store", "app", True),
    ("agent", "agent", "app", True),
    ("token", "admin", "token_app", True),
    ("admin-token", "admin", "admin_token_app", True),
    ("endpoint", "endpoint", "endpoint_app", True),
    ("policy", "admin", "policy_app", True),
    ("layer", "layers", "layer_app", True),
    ("collection", "layers", "collection_app", True),
    ("task", "layers", "task_app", True),
    ("assign", "layers", "assign", False),
    ("compliance", "layers", "compliance", False),
    ("migrate", "layers", "migrate", False),
    ("signing", "signing", "signing_app", True),
    ("user", "users", "user_app", True),
    ("portal", "portal", "portal_app", True),
    ("report", "reports", "report_app", True),
    ("reflector", "reflector", "reflector_app", True),
    ("server", "server", "serve", False),
]


# What the commands of every group but `server` and `mount` import as they run (typer's
# parameter adapters, dates and IDNA host names included). A process that forks many
# commands (the demo's tour, the tests' fork server) imports them once, before it forks:
# the demo's commands spent two thirds of their CPU importing these again, each.
COMMAND_MODULES = (
    *(f"{__package__}.{module}" for module in dict.fromkeys(e[1] for e in _ENTRIES)),
    "strata.agent.cycle", "strata.agent.centralize", "strata.agent.update",
    "strata.agent.enrollment", "strata.agent.status", "strata.agent.live_compliance",
    "strata.signing.trust", "strata.signing.publisher", "strata.engine.backup",
    "strata.engine.restore", "strata.layers.capture", "strata.cli.admin_client", "h11",
    "certifi", "typer._adapters", "encodings.idna", "_strptime")


def import_commands() -> None:
    """Import COMMAND_MODULES (httpcore without trio first, as `main` does), and build
    every command tree `main` may ask for."""
    from strata.import_costs import httpcore_without_trio

    httpcore_without_trio()
    for module in COMMAND_MODULES:
        import_module(module)
    for name in (None, *(e[0] for e in _ENTRIES)):
        _command(name)


def build_app(argv: list[str] | None = None) -> typer.Typer:
    """The command tree; only the part `argv` asks for when it names a known command."""
    app = typer.Typer(help="Strata: layered endpoint management on a single-instance store.",
                      no_args_is_help=True, pretty_exceptions_enable=False)

    @app.callback()
    def _top(version: bool = typer.Option(  # also keeps a tree of one command a tree
            False, "--version", is_eager=True, callback=_print_version,
            help="Print the version and exit.")) -> None:
        pass

    wanted = argv[1] if argv and len(argv) > 1 else None
    entries = [e for e in _ENTRIES if e[0] == wanted] or _ENTRIES
    for name, module, attr, is_group in entries:
        target = getattr(import_module(f"{__package__}.{module}"), attr)
        if is_group:
            app.add_typer(target, name=name)
        else:
            app.command(name)(target)
    add_connection_options(app)  # --ca-cert, --server-fingerprint, --insecure
    return app


def command_for(argv: list[str]) -> Callable[..., Any]:
    """The click command that runs this command line: `build_app`'s tree, turned into
    click's once per process and top-level name (16 ms of a quick command's CPU, which a
    process that forks many commands, see COMMAND_MODULES, spends once)."""
    wanted = argv[1] if len(argv) > 1 else None
    return _command(wanted if any(e[0] == wanted for e in _ENTRIES) else None)


@functools.cache
def _command(name: str | None) -> Callable[..., Any]:
    return typer.main.get_command(build_app(["strata", name] if name else None))


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"strata {version('strata')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("strata (version unknown: not installed)")
        raise typer.Exit()


def _os_error(exc: OSError) -> str:
    """`path: reason`, not Python's `[Errno 2] No such file or directory: 'path'`."""
    reason = exc.strerror or str(exc)
    name = exc.filename
    if isinstance(name, bytes):
        name = name.decode(errors="backslashreplace")
    return f"{name}: {reason}" if name else reason


def _not_a_number(exc: cli_exc.UsageError, argv: list[str]) -> str | None:
    """A number option given something else, in plain words with the value at fault
    (click says "Input should be a valid integer, unable to parse string as an
    integer", without the value)."""
    text = exc.format_message()
    if not isinstance(exc, cli_exc.BadParameter) or exc.param is None or \
            not re.search(r"valid (integer|number)", text):
        return None
    kind = "a whole number" if "integer" in text else "a number"
    opts = [o for o in getattr(exc.param, "opts", []) if o.startswith("-")]
    name = opts[0] if opts else str(getattr(exc.param, "name", "") or "value").upper()
    for i, word in enumerate(argv):
        for opt in opts:
            if word == opt and i + 1 < len(argv):
                return f"{name}: {argv[i + 1]!r} is not {kind}"
            if word.startswith(opt + "="):
                return f"{name}: {word[len(opt) + 1:]!r} is not {kind}"
    return f"{name}: not {kind}"


def main() -> None:
    if sys.argv[1:2] != ["store"]:  # every other group talks to a server, or may
        from strata.import_costs import httpcore_without_trio

        httpcore_without_trio()
    try:
        # Not standalone: click would print usage errors as a boxed panel of several
        # lines; each is one line here, like every other error.
        rv = command_for(sys.argv)(standalone_mode=False)
    except cli_exc.NoArgsIsHelpError as exc:  # a bare `strata store`: its help, as before
        exc.show()
        sys.exit(2)
    except cli_exc.UsageError as exc:
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        print_error(_not_a_number(exc, sys.argv) or exc.format_message() + where)
        sys.exit(2)
    except cli_exc.ClickException as exc:
        print_error(exc.format_message())
        sys.exit(exc.exit_code)
    except StrataError as exc:
        print_error(str(exc))
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("interrupted")
        sys.exit(130)
    except OSError as exc:
        print_error(_os_error(exc))
        sys.exit(2)
    sys.exit(rv if isinstance(rv, int) else 0)


def main_status() -> int:
    """Run `main` in this process and return the exit status a `strata` process would end
    with, instead of ending this one: for a child forked to be one command (the demo's,
    the tests' fork server's). As Python ends a process: `sys.exit()` 0, a number that
    number, a message printed on stderr and 1; an interrupt 130; anything else its
    traceback and 1."""
    try:
        main()
        return 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1


if __name__ == "__main__":
    main()

"""The `strata` command: a thin shell over the library."""

from __future__ import annotations

import sys
from importlib import import_module

import typer

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
    ("server", "server", "serve", False),
]


def build_app(argv: list[str] | None = None) -> typer.Typer:
    """The command tree; only the part `argv` asks for when it names a known command."""
    app = typer.Typer(help="Strata: layered endpoint management on a single-instance store.",
                      no_args_is_help=True, pretty_exceptions_enable=False)

    @app.callback()
    def _top() -> None:  # keeps a tree of one command a tree (`strata server ...`)
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


def main() -> None:
    try:
        build_app(sys.argv)()  # standalone: usage errors exit 2 with click's message
    except StrataError as exc:
        print_error(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except OSError as exc:
        print_error(str(exc))
        sys.exit(2)


if __name__ == "__main__":
    main()

"""The `strata` command: a thin shell over the library."""

from __future__ import annotations

import sys

import typer

from strata.errors import StrataError

from . import store as store_cli
from .output import err_console, print_error

app = typer.Typer(help="Strata: layered endpoint management on a single-instance store.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(store_cli.app, name="store")


def main() -> None:
    try:
        app()  # standalone: usage errors exit 2 with click's message
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

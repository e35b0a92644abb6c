"""The `strata` command: a thin shell over the library."""

from __future__ import annotations

import sys

import typer

from strata.errors import StrataError

from . import admin as admin_cli
from . import agent as agent_cli
from . import layers as layers_cli
from . import server as server_cli
from . import store as store_cli
from .output import err_console, print_error

app = typer.Typer(help="Strata: layered endpoint management on a single-instance store.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(store_cli.app, name="store")
app.add_typer(agent_cli.app, name="agent")
app.add_typer(admin_cli.token_app, name="token")
app.add_typer(admin_cli.endpoint_app, name="endpoint")
app.add_typer(admin_cli.policy_app, name="policy")
app.add_typer(layers_cli.layer_app, name="layer")
app.add_typer(layers_cli.collection_app, name="collection")
app.add_typer(layers_cli.task_app, name="task")
app.command("assign")(layers_cli.assign)
app.command("compliance")(layers_cli.compliance)
app.command("migrate")(layers_cli.migrate)
app.command("server")(server_cli.serve)


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

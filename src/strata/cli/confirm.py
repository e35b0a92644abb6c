"""Asking before a command destroys or overwrites something: on a terminal the person
sees what will be lost and answers; a script passes `--yes`; without either the command
refuses in one line and changes nothing (a cron job must never wipe by accident)."""

from __future__ import annotations

import sys

import typer

from strata.errors import StrataError

from .output import err_console

YES = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation (for scripts).")
SHOWN = 20  # lines of "what will be lost" printed before "… and N more"


class NotConfirmed(StrataError):
    """Refused, or answered no: nothing was changed (exit code 2, as any refusal: 1 means
    done in part)."""


def confirm(action: str, losses: list[str], *, yes: bool) -> None:
    """Return if the person (or `--yes`) agrees to `action`, which loses `losses`
    (one line each); raise NotConfirmed otherwise, before anything is touched."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise NotConfirmed(f"{action}: refusing without --yes (no terminal to ask on)")
    err_console.print(f"{action}:", highlight=False, markup=False)
    for line in losses[:SHOWN]:
        err_console.print(f"  {line}", highlight=False, markup=False)
    if len(losses) > SHOWN:
        err_console.print(f"  … and {len(losses) - SHOWN} more", highlight=False)
    if not typer.confirm("Go ahead?", default=False, err=True):
        raise NotConfirmed("cancelled: nothing was changed")

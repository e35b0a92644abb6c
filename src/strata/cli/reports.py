"""`strata report software|storage`: the fleet's installed software and storage per CVD,
as a table, `--csv` or `--json` (thin client of the admin API's /reports)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from strata.errors import StrataError
from strata.model.csv_table import csv_text

from .admin_args import JSON, SERVER, TOKEN_FILE, client, print_model
from .output import clean, console, human_bytes, iso_time

report_app = typer.Typer(help="Reports: installed software, storage per CVD.",
                         no_args_is_help=True)
CSV = typer.Option(False, "--csv", help="Print CSV (one header line).")


def _cleaned(rows: list[list[object]]) -> list[list[str]]:
    """Hostnames come from endpoints: no control character reaches the terminal, CSV or
    not (an escape sequence in a cell would run there)."""
    return [[clean(v) for v in row] for row in rows]


def _one_format(csv: bool, json: bool) -> None:
    if csv and json:
        raise StrataError("give --csv or --json, not both")


@report_app.command("software")
def report_software(package: str = typer.Option("", "--package", help="A package name, "
                                                "or a prefix and * (e.g. 'libssl*')."),
                    endpoint: str = typer.Option("", "--endpoint", help="One endpoint's "
                                                 "packages."),
                    csv: bool = CSV, json: bool = JSON, server: str | None = SERVER,
                    admin_token_file: Path | None = TOKEN_FILE) -> None:
    """Which endpoints have a package, at which version; one endpoint's packages; or
    each package across the fleet (by name, endpoints, versions)."""
    _one_format(csv, json)
    doc = client(server, admin_token_file).software_report(package, endpoint)
    if json:
        print_model(doc)
        return
    if not package and not endpoint:
        header = ["package", "endpoints", "versions"]
        rows = [[s.name, s.endpoints, " ".join(f"{v}={n}" for v, n in s.versions.items())]
                for s in doc.summary]
    else:
        header = ["endpoint", "hostname", "package", "version", "arch", "manager"]
        rows = [[r.endpoint, r.hostname, r.name, r.version, r.arch, r.manager]
                for r in doc.rows]
    if csv:
        sys.stdout.write(csv_text(header, _cleaned(rows)))
        return
    table = Table(*(h.capitalize() for h in header))
    for row in rows:
        table.add_row(*(str(v)[:8] if h == "endpoint" else clean(v)
                        for h, v in zip(header, row, strict=True)))
    console.print(table)
    shown = len(rows)
    console.print(f"{shown} of {doc.total} row(s); {doc.reporting} endpoint(s) have sent "
                  "a package list", highlight=False)


@report_app.command("storage")
def report_storage(csv: bool = CSV, json: bool = JSON, server: str | None = SERVER,
                   admin_token_file: Path | None = TOKEN_FILE) -> None:
    """Per CVD: logical bytes (what its snapshots name), unique bytes (what only it
    references: deleting it frees them) and their share of the store."""
    _one_format(csv, json)
    doc = client(server, admin_token_file).storage_report()
    if json:
        print_model(doc)
        return
    header = ["endpoint", "hostname", "snapshots", "logical_bytes", "unique_bytes",
              "unique_stored_bytes", "share_percent"]
    rows = [[c.endpoint, c.hostname, c.snapshots, c.logical_bytes, c.unique_bytes,
             c.unique_stored_bytes, c.share] for c in doc.cvds]
    if csv:
        sys.stdout.write(csv_text(header, _cleaned(rows)))
        return
    table = Table("Endpoint", "Host", "Snapshots", "Logical", "Unique", "Stored",
                  "Share of store")
    for c in doc.cvds:
        table.add_row(c.endpoint[:8], clean(c.hostname), str(c.snapshots), human_bytes(
            c.logical_bytes), human_bytes(c.unique_bytes), human_bytes(c.unique_stored_bytes),
            f"{c.share:.2f}%")
    console.print(table)
    console.print(f"store: {human_bytes(doc.store_bytes)} of chunks; computed "
                  f"{iso_time(doc.computed_at)}", highlight=False)

"""`strata reflector …`: on the branch host, enroll, run, status, warm and import; for
IT, list, show, retire and reinstate (thin clients of the admin API)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from .admin_args import JSON, SERVER, TOKEN_FILE, client, layer_ref, print_model
from .confirm import YES, confirm
from .output import console, human_bytes, iso_time, print_json
from .secrets import read_secret

if TYPE_CHECKING:
    from strata.reflector.state import ReflectorState

reflector_app = typer.Typer(help="Branch reflectors: chunk caches at branch offices.",
                            no_args_is_help=True)
STATE = typer.Option(None, "--state", help="Reflector state directory (default "
                     "/var/lib/strata-reflector).")


def _state(state: Path | None) -> ReflectorState:
    from strata.reflector.state import ReflectorState, default_state_dir

    return ReflectorState(state or default_state_dir())


# -- on the branch host ----------------------------------------------------------------------


@reflector_app.command("enroll")
def enroll(server: str = typer.Option(..., "--server", envvar="STRATA_SERVER"),
           token_file: Path | None = typer.Option(None, "--token-file", help="File holding "
                                                  "a reflector enrollment token (`strata "
                                                  "token create --reflector`)."),
           listen: str = typer.Option(..., "--listen", help="HOST:PORT the branch's agents "
                                      "reach it at."),
           cache: Path = typer.Option(..., "--cache", help="Folder of the chunk cache."),
           cache_size: str = typer.Option("10GiB", "--cache-size", help="Most the cache "
                                          "holds (e.g. 500GiB); least recently used first "
                                          "out."),
           url: str = typer.Option("", "--url", help="URL agents use, if not the listen "
                                   "address (a name, NAT)."),
           name: str = typer.Option("", "--name", help="A name for `reflector list` "
                                    "(default: the host name)."),
           ca_cert: Path | None = typer.Option(None, "--ca-cert", help="CA bundle to trust "
                                               "for the server."),
           server_fingerprint: str | None = typer.Option(
               None, "--server-fingerprint", envvar="STRATA_SERVER_FINGERPRINT",
               help="SHA-256 fingerprint of the server's certificate: checked now, then "
               "the only one accepted."),
           insecure: bool = typer.Option(False, "--insecure", help="Plain http:// to and "
                                         "from other machines (a network you trust)."),
           tls: bool = typer.Option(False, "--tls", help="Serve HTTPS on loopback too."),
           force: bool = typer.Option(False, "--force", help="Enroll anew a state "
                                      "directory already enrolled."),
           site: str | None = typer.Option(None, "--site", help="The branch's site name, "
                                           "for the bandwidth rules (as `strata agent "
                                           "site`); its subnet is matched too."),
           state: Path | None = STATE, json: bool = JSON) -> None:
    """Register this host as a branch reflector with a reflector enrollment token."""
    from strata.agent.location import check_site
    from strata.reflector.daemon import enroll as run_enroll

    from .store import parse_size

    secret = read_secret(None, token_file, env="STRATA_ENROLL_TOKEN",
                         what="enrollment token", prompt="Reflector enrollment token")
    cfg = run_enroll(_state(state), server=server, token=secret, listen=listen, cache=cache,
                     cache_size=parse_size(cache_size), url=url, name=name,
                     ca_cert=str(ca_cert.resolve()) if ca_cert else "",
                     server_fingerprint=server_fingerprint, insecure=insecure, tls=tls,
                     force=force, site=check_site(site) if site else None)
    if json:
        print_json({"reflector_id": cfg.reflector_id, "url": cfg.url, "cache": cfg.cache,
                    "cache_size": cfg.cache_size})
    else:
        console.print(f"enrolled as reflector {cfg.reflector_id}; agents reach it at "
                      f"{cfg.url}. Name it in a `reflectors` policy rule (strata policy set "
                      "reflectors FILE.json), then run `strata reflector run`.",
                      markup=False, highlight=False)


@reflector_app.command("run")
def run(state: Path | None = STATE, poll: float = typer.Option(
        10.0, "--poll", min=0.5, help="Seconds between visits to the server (status, "
        "layers to warm)."), ) -> None:
    """Serve the branch's agents until interrupted (Ctrl-C, SIGTERM)."""
    import logging

    from strata.reflector.daemon import run as run_reflector

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("httpx", "httpcore"):  # a line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run_reflector(_state(state), poll_seconds=poll)


@reflector_app.command("status")
def status(state: Path | None = STATE, json: bool = JSON) -> None:
    """Counters (bytes from the server, bytes served, hits, misses) and the cache."""
    from strata.reflector.daemon import status as read_status

    doc = read_status(_state(state))
    if json:
        print_json(doc)
        return
    for key, value in doc.items():
        shown = human_bytes(value) if "bytes" in key or key == "cache_limit" else \
            ", ".join(value) if isinstance(value, list) else value
        console.print(f"{key}: {shown}", markup=False, highlight=False)


@reflector_app.command("warm")
def warm(layer: str = typer.Argument(..., help="NAME:VERSION"), state: Path | None = STATE,
         json: bool = JSON) -> None:
    """Fetch a layer into the cache now, before the branch's endpoints ask for it."""
    from strata.reflector.daemon import warm as run_warm

    doc = run_warm(_state(state), layer_ref(layer))
    if json:
        print_json(doc)
    else:
        console.print(f"warmed {doc['layer']}: {human_bytes(doc['bytes_from_server'])} from "
                      f"the server in {doc['seconds']} s", markup=False, highlight=False)


@reflector_app.command("import")
def import_(file: Path = typer.Argument(..., help="A bundle `strata layer export` wrote."),
            state: Path | None = STATE, json: bool = JSON) -> None:
    """Seed the cache offline from an exported layer (every chunk checked by its id)."""
    from strata.errors import StrataError
    from strata.reflector.daemon import import_bundle

    try:
        source = open(file, "rb")  # noqa: SIM115 -- closed below
    except OSError as exc:
        raise StrataError(f"cannot read {file}: {exc.strerror}") from None
    with source:
        doc = import_bundle(_state(state), source)
    if json:
        print_json(doc)
    else:
        console.print(f"imported {doc['chunks']} chunks ({human_bytes(doc['bytes_added'])} "
                      f"new); {doc['bad_chunks']} failed their check and were skipped",
                      markup=False, highlight=False)
    if doc["bad_chunks"]:
        raise typer.Exit(1)


# -- for IT ------------------------------------------------------------------------------------


@reflector_app.command("list")
def list_(server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
          json: bool = JSON) -> None:
    """Every reflector: status, URL, what it fetched from the server, agents' reports."""
    rows = client(server, admin_token_file).reflectors()
    if json:
        print_model(rows)
        return
    table = Table("ID", "Name", "Status", "URL", "Last seen", "From server", "Served",
                  "Cache", "Fallbacks", "Bad chunks")
    for r in rows:
        table.add_row(r.id, r.name, r.status, r.url, iso_time(r.last_seen),
                      human_bytes(r.bytes_from_server), human_bytes(r.stats.bytes_served),
                      human_bytes(r.stats.cache_bytes), str(r.fallbacks), str(r.bad_chunks))
    console.print(table)


@reflector_app.command("show")
def show(ref: str = typer.Argument(..., help="Id (or a unique prefix) or name."),
         server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
         json: bool = JSON) -> None:
    """One reflector in detail, with the policy rules that route agents to it."""
    r = client(server, admin_token_file).reflector(ref)
    if json:
        print_model(r)
        return
    lines = [f"reflector {r.id} ({r.name})", f"status: {r.status}"
             + (f" ({r.status_reason})" if r.status_reason else ""),
             f"url: {r.url}", f"certificate: {r.tls_fingerprint or 'none (plain HTTP)'}",
             f"enrolled: {iso_time(r.enrolled_at)}, last seen: {iso_time(r.last_seen)} "
             f"from {r.last_ip}",
             f"from the server: {human_bytes(r.bytes_from_server)} "
             f"({r.chunks_from_server} chunks)",
             f"served: {human_bytes(r.stats.bytes_served)}, hits {r.stats.hits}, misses "
             f"{r.stats.misses}, refused {r.stats.refused}",
             f"cache: {human_bytes(r.stats.cache_bytes)} of {human_bytes(r.stats.cache_limit)}",
             f"agents that went around it: {r.fallbacks}; bad chunks reported: "
             f"{r.bad_chunks}",
             "rules: " + ("; ".join(r.rules) or "none (no agent is sent to it)")]
    for line in lines:
        console.print(line, markup=False, highlight=False)


@reflector_app.command("retire")
def retire(ref: str = typer.Argument(..., help="Id (or a unique prefix) or name."),
           yes: bool = YES, server: str | None = SERVER,
           admin_token_file: Path | None = TOKEN_FILE, json: bool = JSON) -> None:
    """Take a reflector out of service for good: its credential stops working, and its
    agents download from the server (or another reflector of their rule)."""
    api = client(server, admin_token_file)
    r = api.reflector(ref)
    confirm(f"retire reflector {r.id} ({r.name})",
            [f"{len(r.rules)} policy rule(s) name it: " + ("; ".join(r.rules) or "none"),
             "it cannot be reinstated: a retired reflector enrolls again"], yes=yes)
    done = api.set_reflector(r.id, "retire")
    print_model(done) if json else console.print(f"retired reflector {done.id}",
                                                 markup=False, highlight=False)


@reflector_app.command("reinstate")
def reinstate(ref: str = typer.Argument(..., help="Id (or a unique prefix) or name."),
              server: str | None = SERVER, admin_token_file: Path | None = TOKEN_FILE,
              json: bool = JSON) -> None:
    """Put a quarantined reflector back in rotation."""
    done = client(server, admin_token_file).set_reflector(ref, "reinstate")
    print_model(done) if json else console.print(f"reflector {done.id} is {done.status}",
                                                 markup=False, highlight=False)

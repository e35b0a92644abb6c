"""`strata server`: run the datacenter server."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from strata.errors import StrataError

from .output import err_console, log_to_stderr, print_error

if TYPE_CHECKING:
    from fastapi import FastAPI

    from strata.server.listener import ListenAddress
    from strata.server.tls import ServerCertificate

FULL_GC_EVERY = 100  # younger collections between full ones (Python's default: 10)


def default_data_dir() -> Path:
    return Path(os.environ.get("STRATA_DATA", "/var/lib/strata-server"))


def serve(ctx: typer.Context,
          config: Path | None = typer.Option(
              None, "--config", help="A TOML file of these options, one key per flag "
              "(listen = \"0.0.0.0:8470\", tls-cert = \"/etc/strata/cert.pem\", ...); "
              "flags given here override it (docs/deployment.md)."),
          data: Path = typer.Option(None, "--data", help="Data directory (catalog, store, "
                                    "admin token). Default: $STRATA_DATA or "
                                    "/var/lib/strata-server."),
          listen: str = typer.Option("127.0.0.1:8470", "--listen", help="HOST:PORT to serve."),
          tls_cert: Path | None = typer.Option(None, "--tls-cert", help="PEM certificate "
                                               "(default beyond loopback: a self-signed one "
                                               "made in DATA/tls at the first start)."),
          tls_key: Path | None = typer.Option(None, "--tls-key", help="PEM private key."),
          tls: bool = typer.Option(False, "--tls", help="Serve HTTPS on loopback too (with "
                                   "the self-signed certificate unless --tls-cert)."),
          tls_name: list[str] = typer.Option(
              [], "--tls-name", help="A host name or address agents use for this server, "
              "put in the self-signed certificate when it is made (repeatable)."),
          insecure: bool = typer.Option(False, "--insecure", help="Serve plain HTTP beyond "
                                        "loopback (tokens and data cross the network in "
                                        "clear)."),
          catalog: str = typer.Option(
              "", "--catalog", envvar="STRATA_CATALOG",
              help="Catalog database: postgresql://USER@HOST[:PORT]/DATABASE or "
              "sqlite:///PATH (default: SQLite in the data directory). Put the password in "
              "~/.pgpass or $STRATA_CATALOG rather than on the command line."),
          maintenance_interval: float = typer.Option(
              3600, "--maintenance-interval", help="Seconds between retention and prune runs."),
          store: str = typer.Option("", "--store", help="Where the store lives: a directory, "
                                    "or an object store as s3://BUCKET/PREFIX (default: the "
                                    "data directory's store/)."),
          s3_endpoint_url: str = typer.Option(
              "", "--s3-endpoint-url",
              help="S3 endpoint, for MinIO or Ceph RGW (default: $AWS_ENDPOINT_URL, or AWS)."),
          s3_region: str = typer.Option("", "--s3-region", help="S3 region (default: "
                                        "$AWS_REGION or $AWS_DEFAULT_REGION)."),
          encrypt: bool = typer.Option(
              False, "--encrypt", help="Encrypt the store (AES-256-GCM; a new store, or one "
              "made with --encrypt before) under the passphrase or key in --passphrase-file."),
          passphrase_file: Path | None = typer.Option(
              None, "--passphrase-file", envvar="STRATA_PASSPHRASE_FILE",
              help="File holding the store's passphrase or key (or set STRATA_PASSPHRASE)."),
          credential_rotation: str = typer.Option(
              "7d", "--credential-rotation", help="Device credentials are replaced at the "
              "first check-in after this long (e.g. 12h, 7d)."),
          credential_lifetime: str = typer.Option(
              "90d", "--credential-lifetime", help="A device credential not renewed for "
              "this long is refused (the endpoint enrolls again)."),
          metrics_listen: str = typer.Option(
              "", "--metrics-listen", help="Also serve /metrics without a token on this "
              "HOST:PORT (for a Prometheus on a private network)."),
          header_timeout: float = typer.Option(
              20, "--header-timeout", min=0.1, help="Seconds a client has to send a "
              "request's headers."),
          body_timeout: float = typer.Option(
              30, "--body-timeout", min=0.1, help="Seconds a request body may stall before "
              "the connection is closed."),
          common_holders: int = typer.Option(
              3, "--common-holders", min=2, help="How many endpoints must hold the same "
              "private file before others skip sending it (docs/security.md)."),
          ) -> None:
    """Run the Strata server (agent sync API, admin API, retention and GC)."""
    # Imported here: the server stack costs a second of start-up every other command
    # would pay for nothing.
    import uvicorn

    from strata.server.app import create_app, prepare_routes
    from strata.server.catalog.db import is_postgresql
    from strata.server.context import ServerSettings
    from strata.server.data_dir import lock_down
    from strata.server.http_timeouts import timed_protocol
    from strata.server.listener import DataDirLock, bind, parse_listen, serve_metrics
    from strata.server.services.credentials import parse_duration
    from strata.server.tls import server_certificate

    from .store import get_passphrase  # the same rules as `strata store --passphrase-file`

    if config is not None:
        f = _file_settings(ctx, config)
        data, listen, catalog, store = (f.get("data", data), f.get("listen", listen),
                                        f.get("catalog", catalog), f.get("store", store))
        tls_cert, tls_key, tls, tls_name, insecure = (
            f.get("tls_cert", tls_cert), f.get("tls_key", tls_key), f.get("tls", tls),
            f.get("tls_name", tls_name), f.get("insecure", insecure))
        maintenance_interval = f.get("maintenance_interval", maintenance_interval)
        s3_endpoint_url, s3_region = (f.get("s3_endpoint_url", s3_endpoint_url),
                                      f.get("s3_region", s3_region))
        encrypt, passphrase_file = f.get("encrypt", encrypt), f.get("passphrase_file",
                                                                    passphrase_file)
        credential_rotation = f.get("credential_rotation", credential_rotation)
        credential_lifetime = f.get("credential_lifetime", credential_lifetime)
        metrics_listen = f.get("metrics_listen", metrics_listen)
        header_timeout = f.get("header_timeout", header_timeout)
        body_timeout = f.get("body_timeout", body_timeout)
        common_holders = f.get("common_holders", common_holders)
    data_dir = (data or default_data_dir()).resolve()
    address = parse_listen(listen)
    if (s3_endpoint_url or s3_region) and not store.startswith("s3://"):
        raise StrataError("--s3-endpoint-url and --s3-region go with --store s3://BUCKET/PREFIX")
    rotation, lifetime = parse_duration(credential_rotation), parse_duration(credential_lifetime)
    if lifetime <= rotation:
        raise StrataError("--credential-lifetime must be longer than --credential-rotation")
    metrics_address = parse_listen(metrics_listen, "--metrics-listen") if metrics_listen else None
    passphrase = get_passphrase(passphrase_file) if encrypt or passphrase_file or \
        "STRATA_PASSPHRASE" in os.environ else None
    settings = ServerSettings(data_dir=data_dir, catalog_url=catalog,
                              maintenance_interval=maintenance_interval, store=store,
                              s3_endpoint_url=s3_endpoint_url, s3_region=s3_region,
                              encrypt=encrypt, passphrase=passphrase,
                              credential_rotation=rotation, credential_lifetime=lifetime,
                              common_holders=common_holders)
    lock_down(data_dir)  # 0700, and 0600 for every file this process writes
    # One server per data directory, or several on one PostgreSQL catalog.
    lock = DataDirLock(data_dir, shared=is_postgresql(settings.catalog_url)).acquire()
    sock = bind(address)  # a bad or busy address: one line, before anything is announced
    try:
        certificate = server_certificate(address, data_dir, tls=tls, tls_cert=tls_cert,
                                         tls_key=tls_key, tls_names=tls_name,
                                         insecure=insecure)
        app = create_app(settings)  # a catalog that cannot be opened: one CatalogError line
        prepare_routes()  # the first agents' requests do not wait for it
        if metrics_address is not None:
            serve_metrics(metrics_address)
        lines = _banner(address, data_dir, store, app, certificate, metrics_address)
        err_console.print("\n".join(lines), highlight=False)
        log_to_stderr()  # the server's own warnings, cleaned of what clients put in them
        uv_config = uvicorn.Config(
            app, log_level="warning", loop="uvloop",
            http=timed_protocol(header_timeout, body_timeout),
            timeout_keep_alive=30,  # agents reuse their connection between requests
            timeout_graceful_shutdown=10,  # a stalled client does not hold a shutdown
            ssl_certfile=str(certificate.cert) if certificate else None,
            ssl_keyfile=str(certificate.key) if certificate else None)
        # Start-up leaves some 160,000 objects (modules, the app, the catalog's mappings)
        # that live as long as the process: frozen, a full garbage collection no longer
        # walks them. Each one stopped every request for 140-190 ms with 10,000
        # endpoints' records cached, 15-40 ms frozen (bench/openloop.py).
        gc.collect()
        gc.freeze()
        # And while the caches fill (the first minute, or the one after an administrator's
        # change cleared them), each quarter more of long-lived objects made Python walk
        # them all: 4-5 pauses of 50-280 ms in a 10,000-endpoint fleet's first minute,
        # each a p99 miss. A full collection is considered every 100 younger ones instead
        # of every 10: one or two such pauses (cyclic garbage waits longer, not forever).
        gen0, gen1, _ = gc.get_threshold()
        gc.set_threshold(gen0, gen1, FULL_GC_EVERY)
        uvicorn.Server(uv_config).run(sockets=[sock])
    finally:
        sock.close()
        lock.release()


def _file_settings(ctx: typer.Context, path: Path) -> dict:
    """The configuration file's settings (by parameter name) that no flag or environment
    variable overrides; every fault in the file printed, one line each, and exit 2."""
    from strata.server.config_file import ConfigFileInvalid, load_config

    try:
        found = load_config(path)
    except ConfigFileInvalid as exc:
        for problem in exc.problems:
            print_error(problem)
        raise SystemExit(2) from None
    out = {}
    for key, value in found.items():
        name = key.replace("-", "_")
        source = ctx.get_parameter_source(name)
        if source is None or source.name == "DEFAULT":
            out[name] = value
    return out


def _banner(address: ListenAddress, data_dir: Path, store: str, app: FastAPI,
            certificate: ServerCertificate | None,
            metrics_address: ListenAddress | None) -> list[str]:
    """What the server says once it listens: where, with what, and how agents trust it."""
    from strata.server.catalog.db import redact

    ctx = app.state.ctx
    where = f"  store: {store}" if store else ""
    if ctx.store.config.encryption != "none":
        where += "  (encrypted)"
    lines = [f"Strata server on {'https' if certificate else 'http'}://{address}  "
             f"data: {data_dir}{where}",
             f"catalog: {redact(ctx.settings.catalog_url)}",
             f"admin token: {app.state.admin_token_path} (mode 0600)",
             f"metrics: /metrics with the token in {data_dir / 'metrics.token'}"
             + (f", and without one on http://{metrics_address}/metrics"
                if metrics_address else "")]
    if certificate is not None:
        made = " (self-signed, made now)" if certificate.created else \
            (" (self-signed)" if certificate.self_signed else "")
        lines += [f"TLS certificate: {certificate.cert}{made}",
                  f"certificate fingerprint (SHA-256): {certificate.fingerprint}"]
        if certificate.self_signed:
            host = "HOST" if address.is_wildcard else str(address).rpartition(":")[0]
            lines.append(f"agents pin it: strata agent enroll --server https://{host}:"
                         f"{address.port} --server-fingerprint {certificate.fingerprint} "
                         "--token-file FILE")
    elif not address.is_loopback:
        lines.append("warning: plain HTTP beyond loopback (--insecure): enrollment tokens, "
                     "credentials and endpoint data cross the network in clear")
    return lines

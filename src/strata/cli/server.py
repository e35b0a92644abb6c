"""`strata server`: run the datacenter server."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from strata.errors import StrataError

from .output import err_console


def default_data_dir() -> Path:
    return Path(os.environ.get("STRATA_DATA", "/var/lib/strata-server"))


def serve(data: Path = typer.Option(None, "--data", help="Data directory (catalog, store, "
                                    "admin token). Default: $STRATA_DATA or "
                                    "/var/lib/strata-server."),
          listen: str = typer.Option("127.0.0.1:8470", "--listen", help="HOST:PORT to serve."),
          tls_cert: Path | None = typer.Option(None, "--tls-cert", help="PEM certificate."),
          tls_key: Path | None = typer.Option(None, "--tls-key", help="PEM private key."),
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
          header_timeout: float = typer.Option(
              20, "--header-timeout", min=0.1, help="Seconds a client has to send a "
              "request's headers."),
          body_timeout: float = typer.Option(
              30, "--body-timeout", min=0.1, help="Seconds a request body may stall before "
              "the connection is closed."),
          ) -> None:
    """Run the Strata server (agent sync API, admin API, retention and GC)."""
    # Imported here: the server stack costs a second of start-up every other command
    # would pay for nothing.
    import uvicorn

    from strata.server.app import create_app
    from strata.server.catalog.db import redact
    from strata.server.context import ServerSettings
    from strata.server.data_dir import lock_down, tighten
    from strata.server.http_timeouts import timed_protocol
    from strata.server.listener import DataDirLock, bind, parse_listen

    data_dir = (data or default_data_dir()).resolve()
    address = parse_listen(listen)
    if bool(tls_cert) != bool(tls_key):
        raise StrataError("--tls-cert and --tls-key go together")
    if (s3_endpoint_url or s3_region) and not store.startswith("s3://"):
        raise StrataError("--s3-endpoint-url and --s3-region go with --store s3://BUCKET/PREFIX")
    settings = ServerSettings(data_dir=data_dir, catalog_url=catalog,
                              maintenance_interval=maintenance_interval, store=store,
                              s3_endpoint_url=s3_endpoint_url, s3_region=s3_region)
    lock_down(data_dir)  # 0700, and 0600 for every file this process writes
    lock = DataDirLock(data_dir).acquire()  # one server per data directory
    sock = bind(address)  # a bad or busy address: one line, before anything is announced
    try:
        app = create_app(settings)  # a catalog that cannot be opened: one CatalogError line
        if not store.startswith("s3://"):
            tighten(Path(store) if store else data_dir / "store")
        scheme = "https" if tls_cert else "http"
        where = f"  store: {store}" if store else ""
        err_console.print(f"Strata server on {scheme}://{address}  data: {data_dir}{where}\n"
                          f"catalog: {redact(settings.catalog_url)}\n"
                          f"admin token: {app.state.admin_token_path} (mode 0600)",
                          highlight=False)
        config = uvicorn.Config(
            app, log_level="warning", loop="uvloop",
            http=timed_protocol(header_timeout, body_timeout),
            timeout_keep_alive=30,  # agents reuse their connection between requests
            ssl_certfile=str(tls_cert) if tls_cert else None,
            ssl_keyfile=str(tls_key) if tls_key else None)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        lock.release()

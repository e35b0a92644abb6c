"""Building the FastAPI application: the store, the catalog, routes, metrics, upkeep."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Header, HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import InterfaceError, OperationalError, StatementError
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute

from strata import __version__
from strata.errors import StrataError
from strata.server import metrics
from strata.server.asgi_metrics import MetricsMiddleware
from strata.server.auth import TokenFile, ensure_admin_token, ensure_token_file, same_secret
from strata.server.body_limit import BodyLimitMiddleware
from strata.server.cache_coherence import CacheInvalidations
from strata.server.catalog.db import db_reason, open_catalog
from strata.server.catalog.types import CatalogValueError
from strata.server.console import pages as console_pages
from strata.server.console.pages import mount_console
from strata.server.context import ServerContext, ServerSettings
from strata.server.deps import client_ip, label_permissions
from strata.server.holdings import ChunkHoldings, Holdings
from strata.server.holdings_pg import PgHoldings
from strata.server.maintenance import upkeep_threads
from strata.server.possession import NonceMinter
from strata.server.routes import (
    agent,
    agent_compliance,
    agent_deltas,
    agent_layers,
    agent_sync,
    agent_usage,
    audit,
    collections,
    compliance,
    endpoints,
    layers,
    maintenance,
    operations,
    policies,
    portal,
    reflectors,
    reports,
    signing,
    snapshot_files,
    tokens,
    users,
)
from strata.server.store_location import open_server_store
from strata.server.stream_cache import StreamCache
from strata.store.pg_shared import PgShared

log = logging.getLogger("strata.server")


MAX_ECHOED_INPUT = 200  # characters of a refused value a 422 repeats back
MAX_LISTED_ERRORS = 20  # of a refused request's problems, the first ones a 422 lists


def _finite_or_text(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _short(value: object, budget: int = MAX_ECHOED_INPUT) -> bool:
    """Whether `value` takes about `budget` characters or fewer as JSON, found by looking
    at no more of it than that: a refused body may hold megabytes."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            budget -= 2 + 2 * len(item)
            if budget >= 0:
                todo += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple)):
            budget -= 2 + len(item)
            if budget >= 0:
                todo += item
        elif isinstance(item, (str, bytes)):
            budget -= len(item) + 2
        elif isinstance(item, int):  # its digits, about (repr would write them all out)
            budget -= item.bit_length() // 3 + 1
        else:  # a float, null
            budget -= len(repr(item))
        if budget < 0:
            return False
    return True


@functools.cache
def shared_routes() -> tuple[BaseRoute, ...]:
    """Every route of the API and of the console's pages, included once per process and
    shared by its apps. FastAPI builds a route's request and response models at its first
    match, per inclusion: 0.2 s of CPU for the API's 150, and 0.12 s for the pages, which
    each new app paid again at its first request. The routes hold no state of an app
    (handlers reach the server through `request.app.state`)."""
    api = APIRouter()
    for routes in (agent, agent_sync, agent_layers, tokens, endpoints, policies, layers,
                   collections, compliance, operations, audit, signing, snapshot_files,
                   users, maintenance, agent_deltas, portal, agent_compliance, reports,
                   reflectors, agent_usage):
        label_permissions(routes.router.routes)
        api.include_router(routes.router)
    for agent_facing in (signing.agent_router, reports.agent_router, portal.agent_router,
                         reflectors.reflector_router, reflectors.agent_router,
                         agent_usage.agent_router):
        api.include_router(agent_facing)
    for pages in console_pages.ROUTERS:
        api.include_router(pages)
    return tuple(api.routes)


def prepare_routes() -> None:
    """Build every route's models now rather than at the first request that reaches it
    (a server start does this before it answers; a process that forks servers, once)."""
    scope = {"type": "http", "method": "GET", "path": "/", "root_path": "",
             "path_params": {}}
    for route in shared_routes():
        route.matches(scope)  # a lookup builds what the route needs to answer


def create_app(settings: ServerSettings) -> FastAPI:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    token_path, _ = ensure_admin_token(settings.data_dir)
    metrics_token_path, _ = ensure_token_file(settings.data_dir / "metrics.token", "smet")
    engine, sessions = open_catalog(settings.catalog_url)
    scaled_out = engine.dialect.name == "postgresql"
    holdings: ChunkHoldings
    if scaled_out:
        # Every server process on this catalog shares the chunk index, the store's locks,
        # the holdings and a cache generation in it (docs/deployment.md).
        shared: PgShared | None = PgShared(engine.raw_connection)
        holdings = PgHoldings(engine.raw_connection, settings.common_holders)
    else:
        shared = None
        holdings = Holdings(settings.data_dir / "holdings.sqlite", settings.common_holders)
    store = open_server_store(settings.data_dir, settings.store,
                              s3_endpoint_url=settings.s3_endpoint_url,
                              s3_region=settings.s3_region, passphrase=settings.passphrase,
                              encrypt=settings.encrypt, shared=shared)
    ctx = ServerContext(settings=settings, store=store, db=sessions,
                        streams=StreamCache(settings.data_dir / "cache" / "streams"),
                        holdings=holdings,
                        possession=NonceMinter(settings.data_dir / "possession.key"),
                        coherence=CacheInvalidations(engine.raw_connection)
                        if scaled_out else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threads = upkeep_threads(ctx)
        for t in threads:
            t.start()
        yield
        for t in threads:
            t.stop.set()
        for t in threads:
            t.join(timeout=10)  # the last visits reach the catalog
        ctx.store.close()
        ctx.holdings.close()

    app = FastAPI(title="Strata server", version=__version__, lifespan=lifespan,
                  openapi_url="/api/v1/openapi.json", docs_url="/api/v1/docs")
    app.state.ctx = ctx
    app.state.admin_token = TokenFile(token_path)  # rotated by any process: re-read
    app.state.admin_token_path = token_path
    app.state.metrics_token = TokenFile(metrics_token_path)
    app.router.routes.extend(shared_routes())
    mount_console(app)

    app.add_middleware(BodyLimitMiddleware, upload_limit=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware)  # added last = outermost: it sees the 413s too

    @app.exception_handler(StrataError)
    async def strata_error(_request: Request, exc: StrataError) -> JSONResponse:
        # Services refuse with StrataError subclasses (NotFound, Conflict, Invalid, ...):
        # this is the one place that turns them into HTTP answers.
        retry = getattr(exc, "retry_after", None)
        return JSONResponse({"detail": str(exc)}, status_code=exc.http_status,
                            headers={"Retry-After": str(retry)} if retry else None)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, _exc: ClientDisconnect) -> Response:
        # The client hung up, or was cut off for stalling (server/http_timeouts.py): what
        # it sent is dropped. One line, not a traceback: this happens every day.
        log.warning("%s went away during %s %s", client_ip(request) or "a client",
                    request.method, request.url.path)
        return Response(status_code=400)  # nobody reads it

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the whole input back: megabytes of a refused body,
        # encoded in Python (seconds of CPU), and a 500 when it holds a NaN or an
        # infinity, which Python's JSON parser accepts. Here: the first problems, each
        # input only when short, NaN and infinities as strings.
        shown = [{k: v for k, v in error.items() if k != "input" or _short(v)}
                 for error in exc.errors()[:MAX_LISTED_ERRORS]]
        errors = jsonable_encoder(shown, custom_encoder={float: _finite_or_text})
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StatementError)
    async def catalog_error(_request: Request, exc: StatementError) -> JSONResponse:
        if isinstance(exc.orig, CatalogValueError):  # a value no catalog database takes
            return JSONResponse({"detail": f"refused: {exc.orig}"}, status_code=422)
        if isinstance(exc, (OperationalError, InterfaceError)):
            # The database went away or is restarting: agents retry a 503 later.
            log.warning("catalog unavailable: %s", db_reason(exc))
            return JSONResponse({"detail": "the catalog database is unavailable; "
                                 "try again later"}, status_code=503,
                                headers={"Retry-After": "10"})
        raise exc

    @app.get("/api/v1/health", tags=["health"])
    def health() -> dict:
        return {"status": "ok", "version": __version__, "store": ctx.store.config.id}

    @app.get("/metrics", tags=["health"])
    def prometheus(authorization: str | None = Header(None)) -> Response:
        """Prometheus metrics, for the token in DATA/metrics.token (or the admin token):
        request rates and byte counts say when and how much each fleet backs up.
        `strata server --metrics-listen` serves them without a token on another address."""
        token = (authorization or "").removeprefix("Bearer ").strip()
        if not token or not (same_secret(token, app.state.metrics_token.digest())
                             or same_secret(token, app.state.admin_token.digest())):
            raise HTTPException(401, "metrics need 'Authorization: Bearer <token>' with the "
                                "token in DATA/metrics.token",
                                headers={"WWW-Authenticate": "Bearer"})
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app

"""The reflector's HTTP API for the agents of its branch. It mirrors the server's download
routes (the same paths, bodies and chunk-stream and bundle formats, model/transfer.py),
so the agent downloads from it with the very code it uses against the server; the
bearer is the agent's ticket, not its device credential (which never leaves the WAN
path to the server)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from strata import __version__
from strata.errors import StrataError
from strata.model.ids import is_hex_id
from strata.model.transfer import BundleWriter, pack_stream
from strata.model.wire import ChunkRequest
from strata.reflector.service import ReflectorService
from strata.server.body_limit import JSON_LIMIT, BodyLimitMiddleware
from strata.server.services.manifests import parse_chunk_ids as parse_ids

log = logging.getLogger("strata.reflector")
LAN_LEVEL = 3  # zstd level towards agents: the branch LAN is fast, the reflector's CPU is not


def _ticket(authorization: str | None) -> str:
    if not authorization or not authorization.startswith("Bearer "):
        raise HTTPException(401, "missing ticket: send 'Authorization: Bearer <ticket>'")
    return authorization[len("Bearer "):].strip()


def create_app(service: ReflectorService) -> FastAPI:
    app = FastAPI(title="Strata branch reflector", version=__version__, openapi_url=None,
                  docs_url=None, redoc_url=None)
    # Agents send only JSON lists of ids: 4 MiB holds 10,000 of them many times over.
    app.add_middleware(BodyLimitMiddleware, upload_limit=JSON_LIMIT)

    @app.exception_handler(StrataError)
    async def strata_error(_request: Request, exc: StrataError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.http_status)

    @app.get("/api/v1/health")
    def health() -> dict:
        return {"status": "ok", "version": __version__, "reflector": service.reflector_id}

    @app.post("/api/v1/agent/layers/chunks")
    def layer_chunks(body: ChunkRequest, authorization: str | None = Header(None)) -> Response:
        """Chunks of the layers the ticket names, as one zstd stream (as the server's)."""
        chunks = service.serve(parse_ids(body.ids), _ticket(authorization))
        data = pack_stream(chunks, LAN_LEVEL)
        service.counters.add(bytes_served=len(data))
        return Response(content=data, media_type="application/x-strata-stream")

    @app.post("/api/v1/agent/snapshots/{sid}/chunks")
    def snapshot_chunks(sid: str, body: ChunkRequest,
                        authorization: str | None = Header(None)) -> Response:
        """Chunks of one of the endpoint's own snapshots, as a bundle (as the server's)."""
        if not is_hex_id(sid):
            raise HTTPException(422, "a snapshot id is 64 lowercase hex digits")
        chunks = service.serve(parse_ids(body.ids), _ticket(authorization), snapshot=sid)
        bundle = BundleWriter()
        for cid, raw in chunks:
            bundle.add(cid, len(raw), b"\x00" + raw)
        data = bundle.getvalue()
        service.counters.add(bytes_served=len(data))
        return Response(content=data, media_type="application/octet-stream")

    return app

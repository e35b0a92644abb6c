"""The reflector's HTTP API for the agents of its branch. It mirrors the server's download
routes (the same paths, bodies and chunk-stream and bundle formats, model/transfer.py),
so the agent downloads from it with the very code it uses against the server; the
bearer is the agent's ticket, not its device credential (which never leaves the WAN
path to the server)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from strata import __version__
from strata.errors import StrataError
from strata.model.ids import is_hex_id
from strata.model.transfer import MAGIC, STREAM_MAGIC, bundle_record
from strata.model.wire import ChunkRequest
from strata.reflector.service import ReflectorService
from strata.server.body_limit import JSON_LIMIT, BodyLimitMiddleware
from strata.server.services.manifests import parse_chunk_ids as parse_ids

log = logging.getLogger("strata.reflector")
LAN_LEVEL = 3  # zstd level towards agents: the branch LAN is fast, the reflector's CPU is not
FLUSH_BYTES = 1 << 20  # compressed bytes gathered before they are sent


def _ticket(authorization: str | None) -> str:
    if not authorization or not authorization.startswith("Bearer "):
        raise HTTPException(401, "missing ticket: send 'Authorization: Bearer <ticket>'")
    return authorization[len("Bearer "):].strip()


def _compressed(service: ReflectorService,
                items: Iterator[tuple[bytes, bytes] | None]) -> Iterator[bytes]:
    """A `pack_stream` body written as the chunks come: one zstd frame, flushed whenever
    the next chunk has to be waited for, so the agent gets what is ready at once."""
    import zstandard

    cobj = zstandard.ZstdCompressor(level=LAN_LEVEL).compressobj()
    out = [STREAM_MAGIC, cobj.compress(MAGIC)]
    for item in items:
        if item is None:  # a wait: send what is ready
            out.append(cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        else:
            cid, raw = item
            out.append(cobj.compress(bundle_record(cid, len(raw), b"\x00" + raw)))
            if sum(map(len, out)) < FLUSH_BYTES:
                continue
            out.append(cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        piece = b"".join(out)
        out = []
        if piece:
            service.counters.add(bytes_served=len(piece))
            yield piece
    piece = b"".join(out) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
    service.counters.add(bytes_served=len(piece))
    yield piece


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
    def layer_chunks(body: ChunkRequest,
                     authorization: str | None = Header(None)) -> StreamingResponse:
        """Chunks of the layers the ticket names, as one zstd stream (the server's format),
        sent as they become available."""
        text = _ticket(authorization)
        ids, ticket = service.admit(parse_ids(body.ids), text)  # refusals before any byte
        return StreamingResponse(_compressed(service, service.stream(ids, ticket, text)),
                                 media_type="application/x-strata-stream")

    @app.post("/api/v1/agent/snapshots/{sid}/chunks")
    def snapshot_chunks(sid: str, body: ChunkRequest,
                        authorization: str | None = Header(None)) -> StreamingResponse:
        """Chunks of one of the endpoint's own snapshots, as a bundle (as the server's)."""
        if not is_hex_id(sid):
            raise HTTPException(422, "a snapshot id is 64 lowercase hex digits")
        text = _ticket(authorization)
        ids, ticket = service.admit(parse_ids(body.ids), text, sid)

        def records() -> Iterator[bytes]:
            yield MAGIC
            for item in service.stream(ids, ticket, text, sid):
                if item is not None:  # a bundle has no filler: the wait is silent
                    record = bundle_record(item[0], len(item[1]), b"\x00" + item[1])
                    service.counters.add(bytes_served=len(record))
                    yield record

        return StreamingResponse(records(), media_type="application/octet-stream")

    @app.get("/api/v1/agent/deltas/{did}")
    def delta(did: str, authorization: str | None = Header(None)) -> Response:
        """A file delta's body, by id (the BLAKE3 of the body), for a delta ticket that
        names it (docs/reflectors.md); the agent checks it against the id."""
        if not is_hex_id(did):
            raise HTTPException(422, "a delta id is 64 lowercase hex digits")
        data = service.delta(bytes.fromhex(did), _ticket(authorization))
        service.counters.add(bytes_served=len(data), deltas_served=1)
        return Response(content=data, media_type="application/zstd")

    return app

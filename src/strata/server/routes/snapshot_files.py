"""Admin API: browsing an endpoint's snapshots (list a folder, download a file or a
folder as tar or zip) and reading one for a remote mount or export (manifest, chunks)."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from strata.model.roles import Permission
from strata.model.snapshot_files import MAX_CHUNKS, MAX_LISTED, SnapshotFolder
from strata.server.context import ServerContext
from strata.server.deps import admin_router, get_ctx, require
from strata.server.services import snapshot_files

router = admin_router("snapshot files")
# Listing a folder is viewing; reading contents is restoring files (the help desk may).
reads_files = require(Permission.RESTORE)
BASE = "/endpoints/{ref}/snapshots/{snapshot}"
PATH = Query("", max_length=4096, description="A path in the snapshot; '' for its root.")
PATH_HEX = Query(None, max_length=8192, description="Instead of path: its bytes in hex, "
                 "for a name that is not UTF-8 (`raw_name` in a listing).")
BINARY: dict[int | str, dict[str, Any]] = {200: {"content": {"application/octet-stream": {}}}}


class SnapshotChunkRequest(BaseModel):
    ids: list[str] = Field(max_length=MAX_CHUNKS)


@router.get(BASE + "/files", response_model=SnapshotFolder)
def list_files(ref: str, snapshot: str, path: str = PATH, path_hex: str | None = PATH_HEX,
               offset: int = 0, limit: int = Query(1000, ge=1, le=MAX_LISTED),
               ctx: ServerContext = Depends(get_ctx),
               _: str = Depends(require(Permission.VIEW))) -> SnapshotFolder:
    """A folder of a snapshot (`snapshot`: an id, a unique prefix, or `latest`)."""
    return snapshot_files.list_folder(ctx, ref, snapshot,
                                      snapshot_files.path_from_hex(path, path_hex),
                                      offset, limit)


@router.get(BASE + "/download", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {},
                                         "application/x-tar": {}, "application/zip": {}}}})
def download(ref: str, snapshot: str, path: str = PATH, path_hex: str | None = PATH_HEX,
             format: str | None = Query(None, description="raw (a file's bytes; the default "
                                        "for a file), tar (the default for a folder) or zip"),
             ctx: ServerContext = Depends(get_ctx),
             actor: str = Depends(reads_files)) -> StreamingResponse:
    """A file, or a folder as an archive, streamed (429 while too many are running)."""
    d = snapshot_files.download(ctx, ref, snapshot, snapshot_files.path_from_hex(path, path_hex),
                                format, actor)
    headers = {"Content-Disposition": d.disposition}
    if d.size is not None:
        headers["Content-Length"] = str(d.size)
    return StreamingResponse(d.body, media_type=d.media_type, headers=headers)


@router.get(BASE + "/manifest", response_class=Response, responses=BINARY)
def get_manifest(ref: str, snapshot: str, ctx: ServerContext = Depends(get_ctx),
                 actor: str = Depends(reads_files)) -> Response:
    """The snapshot's manifest, its id in X-Strata-Snapshot and its time (ISO 8601) in
    X-Strata-Snapshot-Time: a remote mount's or export's start."""
    sid, when, data = snapshot_files.manifest(ctx, ref, snapshot, actor)
    return Response(content=data, media_type="application/octet-stream",
                    headers={"X-Strata-Snapshot": sid, "X-Strata-Snapshot-Time": when})


@router.post(BASE + "/chunks", response_class=Response, responses=BINARY,
             dependencies=[Depends(reads_files)])
def fetch_chunks(ref: str, snapshot: str, body: SnapshotChunkRequest,
                 ctx: ServerContext = Depends(get_ctx)) -> Response:
    """Chunks of that snapshot (no other), as a bundle of verified payloads."""
    return Response(content=snapshot_files.chunks(ctx, ref, snapshot, body.ids),
                    media_type="application/octet-stream")

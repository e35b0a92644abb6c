"""Signed layers: the admin routes through which the image manager's CLI sets signing
up, reads what it signs and uploads what it signed, and the routes through which agents
fetch the metadata (the root alone is public: an agent pins it before enrolling)."""

from __future__ import annotations

from typing import Any

import zstandard
from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, Field

from strata.model.roles import Permission
from strata.server.context import ServerContext
from strata.server.deps import AGENT_API, admin_router, get_ctx, require, require_device
from strata.server.services import signing

router = admin_router("signing", Permission.LAYERS)
agent_router = APIRouter(tags=["signing"])
ROOT_LIMIT = 1 << 20
TARGETS_LIMIT = 32 << 20


def _json(data: bytes) -> Response:
    return Response(content=data, media_type="application/json")


@router.get("/signing")
def status(ctx: ServerContext = Depends(get_ctx)) -> dict:
    """Versions, expiry dates, fingerprints, signed and unsigned layers."""
    return signing.status(ctx)


class OnlineKeyRequest(BaseModel):
    rotate: bool = False


@router.post("/signing/online-key")
def online_key(body: OnlineKeyRequest, ctx: ServerContext = Depends(get_ctx)) -> dict:
    """The public part of the server's online key (made on first use); with `rotate`, of
    the next one, which takes over once a root naming it is uploaded."""
    return signing.online_key(ctx, rotate=body.rotate)


class InitRequest(BaseModel):
    root: str = Field(max_length=ROOT_LIMIT)
    targets: str = Field(max_length=TARGETS_LIMIT)


@router.post("/signing/init")
def init(body: InitRequest, ctx: ServerContext = Depends(get_ctx),
         actor: str = Depends(require(Permission.LAYERS))) -> dict:
    return signing.initialize(ctx, body.root.encode(), body.targets.encode(), actor=actor)


class TargetsRequest(BaseModel):
    targets: str = Field(max_length=TARGETS_LIMIT)


@router.post("/signing/targets")
def publish_targets(body: TargetsRequest, ctx: ServerContext = Depends(get_ctx),
                    actor: str = Depends(require(Permission.LAYERS))) -> dict:
    return signing.publish_targets(ctx, body.targets.encode(), actor=actor)


class RootRequest(BaseModel):
    root: str = Field(max_length=ROOT_LIMIT)
    targets: str | None = Field(default=None, max_length=TARGETS_LIMIT)


@router.post("/signing/root")
def publish_root(body: RootRequest, ctx: ServerContext = Depends(get_ctx),
                 actor: str = Depends(require(Permission.LAYERS))) -> dict:
    return signing.publish_root(ctx, body.root.encode(),
                                body.targets.encode() if body.targets else None, actor=actor)


# TUF metadata is served as the exact bytes that were signed (re-serialising would break
# the signatures), so the OpenAPI document names its shape by hand.
_TUF_DOCUMENT: dict[int | str, dict[str, Any]] = {200: {
    "description": "TUF metadata, as signed", "content": {
    "application/json": {"schema": {
        "title": "TufMetadata", "type": "object", "required": ["signed", "signatures"],
        "properties": {"signed": {"type": "object"},
                       "signatures": {"type": "array", "items": {"type": "object"}}}}}}}}
_ZSTD_MANIFEST: dict[int | str, dict[str, Any]] = {200: {
    "description": "the layer manifest, zstd-compressed", "content": {"application/zstd": {}}}}


@router.get("/signing/metadata/{filename}", response_class=Response, responses=_TUF_DOCUMENT)
def admin_metadata(filename: str, ctx: ServerContext = Depends(get_ctx)) -> Response:
    return _json(signing.metadata(ctx, filename))


@router.get("/signing/layers/{ref}")
def layer_facts(ref: str, ctx: ServerContext = Depends(get_ctx)) -> dict:
    return signing.layer_facts(ctx, ref)


@router.get("/signing/layers/{ref}/manifest", response_class=Response,
            responses=_ZSTD_MANIFEST)
def layer_manifest(ref: str, ctx: ServerContext = Depends(get_ctx)) -> Response:
    data = zstandard.ZstdCompressor(level=3).compress(signing.layer_manifest(ctx, ref))
    return Response(content=data, media_type="application/zstd")


@router.get("/signing/assignment/{ref}")
def assignment_view(ref: str, ctx: ServerContext = Depends(get_ctx)) -> dict:
    return signing.assignment_view(ctx, ref)


@agent_router.get("/api/v1/signing/root.json")
def public_root(ctx: ServerContext = Depends(get_ctx)) -> Response:
    """The newest root, for an agent to pin at enrollment (public keys only)."""
    return _json(signing.metadata(ctx, "root.json"))


@agent_router.get(AGENT_API + "/tuf/{filename}", dependencies=[Depends(require_device)])
def agent_metadata(filename: str, ctx: ServerContext = Depends(get_ctx)) -> Response:
    return _json(signing.metadata(ctx, filename))

"""Signed layers on the server: the admin routes through which the image manager's CLI
sets signing up, reads what it signs and uploads what it signed, and the routes through
which agents fetch the metadata. The server checks every upload (signatures against the
current root, versions, expiry, shape) but cannot sign anything an agent relies on: it
holds only the online key of the snapshot and timestamp roles. See docs/security.md."""

from __future__ import annotations

import zstandard
from fastapi import APIRouter, Depends, HTTPException, Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from strata.errors import CorruptData, SnapshotNotFound
from strata.server.catalog.models import Assignment, Layer
from strata.server.context import ServerContext
from strata.server.deps import NO_SIGNING, audit, get_ctx, require_admin, require_device
from strata.server.layers import snapshot_manifest_bytes
from strata.server.routes.admin import _find_endpoint
from strata.server.routes.layers import _layer
from strata.signing import SigningError

admin_router = APIRouter(prefix="/api/v1/admin/signing", tags=["signing"],
                         dependencies=[Depends(require_admin)])
agent_router = APIRouter(tags=["signing"])


def _refused(exc: SigningError) -> HTTPException:
    return HTTPException(422, f"signed metadata refused: {exc}")


def _metadata(ctx: ServerContext, filename: str) -> Response:
    data = ctx.signing.read(filename)
    if data is None:
        raise HTTPException(404, f"no signed metadata {filename!r}" if ctx.signing.initialized
                            else NO_SIGNING)
    return Response(content=data, media_type="application/json")


# -- the image manager's CLI ------------------------------------------------------------------

@admin_router.get("")
def signing_status(ctx: ServerContext = Depends(get_ctx)) -> dict:
    doc = ctx.signing.status()
    if doc.get("layers") is not None:
        signed = set(doc["layers"])
        with ctx.session() as db:
            refs = [f"{r.name}:{r.version}" for r in db.scalars(select(Layer)
                                                                 .order_by(Layer.id))]
        doc["unsigned_layers"] = [r for r in refs if r not in signed]
    return doc


class OnlineKeyBody(BaseModel):
    rotate: bool = False


@admin_router.post("/online-key")
def online_key(body: OnlineKeyBody, ctx: ServerContext = Depends(get_ctx)) -> dict:
    """The public part of the server's online key (made on first use); with `rotate`, of
    the next one, which takes over once a root naming it is uploaded."""
    key = ctx.signing.online_key(rotate=body.rotate)
    return {"keyid": key.keyid, "key": key.to_dict()}


class InitBody(BaseModel):
    root: str = Field(max_length=1 << 20)
    targets: str = Field(max_length=32 << 20)


@admin_router.post("/init")
def init(body: InitBody, ctx: ServerContext = Depends(get_ctx)) -> dict:
    try:
        ctx.signing.initialize(body.root.encode(), body.targets.encode())
    except SigningError as exc:
        raise _refused(exc) from None
    status = ctx.signing.status()
    audit(ctx, "admin", "signing-init", status["fingerprint"])
    return status


class TargetsBody(BaseModel):
    targets: str = Field(max_length=32 << 20)


@admin_router.post("/targets")
def publish_targets(body: TargetsBody, ctx: ServerContext = Depends(get_ctx)) -> dict:
    try:
        before = ctx.signing.catalog()
    except SigningError:  # a damaged copy on disk: what is uploaded now replaces it
        before = None
    try:
        version = ctx.signing.publish_targets(body.targets.encode())
        after = ctx.signing.catalog()
    except SigningError as exc:
        raise _refused(exc) from None
    layers, scopes = (before.layers, before.assignments) if before else ({}, {})
    changed = sorted({*(f"layers/{r}" for r in after.layers.keys() - layers.keys()),
                      *(p for p, a in after.assignments.items() if scopes.get(p) != a)})
    audit(ctx, "admin", "sign", str(version), changed=changed[:100], count=len(changed))
    return {"version": version, "changed": changed}


class RootBody(BaseModel):
    root: str = Field(max_length=1 << 20)
    targets: str | None = Field(default=None, max_length=32 << 20)


@admin_router.post("/root")
def publish_root(body: RootBody, ctx: ServerContext = Depends(get_ctx)) -> dict:
    try:
        version = ctx.signing.publish_root(body.root.encode(),
                                           body.targets.encode() if body.targets else None)
    except SigningError as exc:
        raise _refused(exc) from None
    status = ctx.signing.status()
    audit(ctx, "admin", "signing-root", str(version), fingerprint=status["fingerprint"],
          targets_keys=status["targets_keys"], online_key=status["online_key"])
    return status


@admin_router.get("/metadata/{filename}")
def admin_metadata(filename: str, ctx: ServerContext = Depends(get_ctx)) -> Response:
    return _metadata(ctx, filename)


@admin_router.get("/layers/{ref}")
def layer_facts(ref: str, ctx: ServerContext = Depends(get_ctx)) -> dict:
    """What a layer's signature covers besides its manifest."""
    with ctx.session() as db:
        row = _layer(db, ref)
        return {"kind": row.kind, "name": row.name, "version": row.version, "os": row.os,
                "match": dict(row.match or {}), "removes": list(row.removes)}


@admin_router.get("/layers/{ref}/manifest")
def layer_manifest(ref: str, ctx: ServerContext = Depends(get_ctx)) -> Response:
    """The layer's manifest exactly as agents get it, for the CLI to hash itself."""
    with ctx.session() as db:
        sid = _layer(db, ref).snapshot
    return Response(content=zstandard.ZstdCompressor(level=3).compress(
        _manifest(ctx, sid)), media_type="application/zstd")


@admin_router.get("/assignment/{ref}")
def assignment_view(ref: str, ctx: ServerContext = Depends(get_ctx)) -> dict:
    """An endpoint's assignment as the server holds it, with the digest of the snapshot
    manifest a revert or restore takes the system from: what the CLI checks, then signs."""
    with ctx.session() as db:
        ep = _find_endpoint(db, ref)
        a = db.get(Assignment, ep.id)
        if a is None:
            raise HTTPException(404, f"endpoint {ep.id[:8]} has no assignment")

        def refs(ids: list[int] | None) -> list[str] | None:
            if ids is None:
                return None
            rows = [db.get(Layer, i) for i in ids]
            return [f"{r.name}:{r.version}" for r in rows if r is not None]
        base = refs([a.base_id] if a.base_id is not None else [])
        doc = {"endpoint": ep.id, "base": base[0] if base else None,
               "apps": refs(list(a.app_ids or [])), "drivers": refs(a.driver_ids),
               "operation": dict(a.operation or {}) or None}
    op = doc["operation"]
    if op and op.get("snapshot"):
        from strata.signing.catalog import ManifestDigest

        op["manifest"] = ManifestDigest.of(_manifest(ctx, op["snapshot"])).model_dump()
    return doc


def _manifest(ctx: ServerContext, sid: str) -> bytes:
    try:
        return snapshot_manifest_bytes(ctx, sid)
    except (SnapshotNotFound, CorruptData) as exc:
        raise HTTPException(500, f"snapshot {sid[:8]} cannot be read: {exc}") from None


# -- agents -----------------------------------------------------------------------------------

@agent_router.get("/api/v1/signing/root.json")
def public_root(ctx: ServerContext = Depends(get_ctx)) -> Response:
    """The newest root, for an agent to pin at enrollment (public keys only)."""
    return _metadata(ctx, "root.json")


@agent_router.get("/api/v1/agent/tuf/{filename}", dependencies=[Depends(require_device)])
def agent_metadata(filename: str, ctx: ServerContext = Depends(get_ctx)) -> Response:
    return _metadata(ctx, filename)

"""Signed layers on the server: what `strata signing` and the signing layer commands read
(layer facts, a manifest as agents get it, an endpoint's assignment with the digest of
the snapshot a revert or restore takes the system from) and what they upload (checked by
the repository, then audited). The server cannot sign anything an agent relies on: it
holds only the online key of the snapshot and timestamp roles (docs/security.md)."""

from __future__ import annotations

from sqlalchemy import select

from strata.errors import NotFound
from strata.server.catalog.models import Assignment, Layer
from strata.server.context import ServerContext
from strata.server.services import audit, snapshots
from strata.server.services.lookup import find_endpoint, find_layer
from strata.signing import SigningError
from strata.signing.catalog import ManifestDigest


def status(ctx: ServerContext) -> dict:
    """What is published, and which captured layers nothing signs yet."""
    doc = ctx.signing.status()
    if doc.get("layers") is not None:
        signed = set(doc["layers"])
        with ctx.session() as db:
            refs = [f"{r.name}:{r.version}" for r in db.scalars(select(Layer)
                                                                 .order_by(Layer.id))]
        doc["unsigned_layers"] = [r for r in refs if r not in signed]
    return doc


def online_key(ctx: ServerContext, *, rotate: bool) -> dict:
    key = ctx.signing.online_key(rotate=rotate)
    return {"keyid": key.keyid, "key": key.to_dict()}


def initialize(ctx: ServerContext, root: bytes, targets: bytes, *, actor: str) -> dict:
    ctx.signing.initialize(root, targets)
    doc = ctx.signing.status()
    audit.record(ctx, actor, "signing-init", doc["fingerprint"])
    return doc


def publish_targets(ctx: ServerContext, targets: bytes, *, actor: str) -> dict:
    try:
        before = ctx.signing.catalog()
    except SigningError:  # a damaged copy on disk: what is uploaded now replaces it
        before = None
    version = ctx.signing.publish_targets(targets)
    after = ctx.signing.catalog()
    layers, scopes = (before.layers, before.assignments) if before else ({}, {})
    changed = sorted({*(f"layers/{r}" for r in after.layers.keys() - layers.keys()),
                      *(p for p, a in after.assignments.items() if scopes.get(p) != a)})
    audit.record(ctx, actor, "sign", str(version), changed=changed[:100], count=len(changed))
    return {"version": version, "changed": changed}


def publish_root(ctx: ServerContext, root: bytes, targets: bytes | None, *,
                 actor: str) -> dict:
    version = ctx.signing.publish_root(root, targets)
    doc = ctx.signing.status()
    audit.record(ctx, actor, "signing-root", str(version), fingerprint=doc["fingerprint"],
                 targets_keys=doc["targets_keys"], online_key=doc["online_key"])
    return doc


def metadata(ctx: ServerContext, filename: str) -> bytes:
    data = ctx.signing.read(filename)
    if data is None:
        raise NotFound(f"no signed metadata {filename!r}" if ctx.signing.initialized
                       else "layer signing is not set up on this server: run `strata "
                            "signing init --keys DIR` (see docs/security.md)")
    return data


def layer_facts(ctx: ServerContext, ref: str) -> dict:
    """What a layer's signature covers besides its manifest."""
    with ctx.session() as db:
        row = find_layer(db, ref)
        return {"kind": row.kind, "name": row.name, "version": row.version, "os": row.os,
                "match": dict(row.match or {}), "removes": list(row.removes)}


def layer_manifest(ctx: ServerContext, ref: str) -> bytes:
    """The layer's manifest exactly as agents get it (decompressed), for the CLI to hash."""
    with ctx.session() as db:
        sid = find_layer(db, ref).snapshot
    return snapshots.manifest_bytes(ctx, sid, "layer")


def assignment_view(ctx: ServerContext, ref: str) -> dict:
    """An endpoint's assignment as the server holds it, with the digest of the snapshot
    manifest a revert or restore takes the system from: what the CLI checks, then signs."""
    with ctx.session() as db:
        ep = find_endpoint(db, ref)
        a = db.get(Assignment, ep.id)
        if a is None:
            raise NotFound(f"endpoint {ep.id[:8]} has no assignment")

        def refs(ids: list[int]) -> list[str]:
            rows = [db.get(Layer, i) for i in ids]
            return [f"{r.name}:{r.version}" for r in rows if r is not None]
        base = refs([a.base_id] if a.base_id is not None else [])
        operation = dict(a.operation or {}) or None
        doc = {"endpoint": ep.id, "base": base[0] if base else None,
               "apps": refs(list(a.app_ids or [])),
               "drivers": refs(list(a.driver_ids)) if a.driver_ids is not None else None,
               "operation": operation}
    if operation and operation.get("snapshot"):
        data = snapshots.manifest_bytes(ctx, str(operation["snapshot"]))
        operation["manifest"] = ManifestDigest.of(data).model_dump()
    return doc

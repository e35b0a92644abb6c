"""Collections of endpoints (named members and/or a rule on OS, hardware, hostname and
tags), and choosing the endpoints an operation targets."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from strata.errors import Invalid, NotFound
from strata.model.admin import CollectionInfo, CollectionRequest, Deleted
from strata.server.catalog.models import Collection, Endpoint
from strata.server.context import ServerContext
from strata.server.services import audit
from strata.server.services.facts import RULE_KEYS, endpoint_matches
from strata.server.services.lookup import find_endpoint


def collection_members(db: Session, name: str) -> list[Endpoint]:
    """The active endpoints in the collection now."""
    coll = db.get(Collection, name)
    if coll is None:
        raise NotFound(f"no collection {name!r}")
    eps = list(db.scalars(select(Endpoint).where(Endpoint.state == "active")))
    return [ep for ep in eps
            if ep.id in coll.members or (coll.rule and endpoint_matches(ep, coll.rule))]


def targets(db: Session, endpoints: list[str], collection: str, every: bool) -> list[Endpoint]:
    """The endpoints an operation names: a list of ids, a collection, or every active one."""
    if sum(bool(x) for x in (endpoints, collection, every)) != 1:
        raise Invalid("name endpoints, a collection, or all")
    if every:
        return list(db.scalars(select(Endpoint).where(Endpoint.state == "active")))
    if collection:
        return collection_members(db, collection)
    return [find_endpoint(db, e) for e in endpoints]


def _info(db: Session, coll: Collection) -> CollectionInfo:
    return CollectionInfo(name=coll.name, rule=coll.rule, members=coll.members,
                          endpoints=[e.id for e in collection_members(db, coll.name)])


def save_collection(ctx: ServerContext, req: CollectionRequest, *,
                    actor: str) -> CollectionInfo:
    """Create or replace a collection."""
    if set(req.rule) - set(RULE_KEYS):
        raise Invalid("collection rules take os, vendor, model, hostname, tag")
    if not req.rule and not req.members:
        raise Invalid("a collection needs a rule or member endpoints")
    with ctx.write() as db:
        members = [find_endpoint(db, m).id for m in req.members]
        row = db.get(Collection, req.name) or Collection(name=req.name)
        row.members, row.rule = members, req.rule
        db.add(row)
        db.flush()
        info = _info(db, row)
    audit.record(ctx, actor, "set-collection", req.name, members=len(members), rule=req.rule)
    return info


def list_collections(ctx: ServerContext) -> list[CollectionInfo]:
    with ctx.session() as db:
        return [_info(db, c) for c in db.scalars(select(Collection).order_by(Collection.name))]


def delete_collection(ctx: ServerContext, name: str, *, actor: str) -> Deleted:
    """Its endpoints keep their layers."""
    with ctx.write() as db:
        row = db.get(Collection, name)
        if row is None:
            raise NotFound(f"no collection {name!r}")
        db.delete(row)
    audit.record(ctx, actor, "delete-collection", name)
    return Deleted(deleted=name)

"""Resolving what an administrator names: an endpoint by its id or a unique prefix of it,
a layer by NAME:VERSION or its numeric id. Nothing looser: a delete, an assignment or a
migration must never guess."""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from strata.errors import Invalid, NotFound
from strata.model.names import LAYER_NAME, LAYER_VERSION
from strata.server.catalog.models import Endpoint, Layer


def find_endpoint(db: Session, ref: str) -> Endpoint:
    # autoescape: an id prefix is text, not a LIKE pattern ('%' must not match everything).
    # Lower case: ids are lower-case UUIDs, and LIKE ignores case on SQLite but not on
    # PostgreSQL, so 'ABC' finds the same endpoint on both.
    rows = list(db.scalars(select(Endpoint).where(
        Endpoint.id.startswith(ref.lower(), autoescape=True)).limit(2)))
    if not rows:
        raise NotFound(f"no endpoint {ref!r}")
    if len(rows) > 1:
        raise NotFound(f"endpoint id {ref!r} is ambiguous")
    return rows[0]


def find_layer(db: Session, ref: str, kind: str | None = None) -> Layer:
    """The layer named NAME:VERSION or by id; if `kind` is given, it must be of that kind.
    A bare NAME is refused rather than read as "the newest version"."""
    name, sep, version = ref.partition(":")
    by_id = ref.isascii() and ref.isdigit()
    if not by_id and not (sep and re.fullmatch(LAYER_NAME, name)
                          and re.fullmatch(LAYER_VERSION, version)):
        raise Invalid(f"malformed layer reference {ref!r}: expected NAME:VERSION, "
                      "e.g. corp-os:2")
    row = db.get(Layer, int(ref)) if by_id else db.scalar(
        select(Layer).where(Layer.name == name, Layer.version == version))
    if row is None:
        raise NotFound(f"no layer {ref!r}")
    if kind and row.kind != kind:
        article = "an" if row.kind[0] in "aeiou" else "a"
        raise Invalid(f"layer {ref!r} is {article} {row.kind} layer, not {kind}")
    return row

"""Storage figures: what the store holds, and what deduplication and compression save."""

from __future__ import annotations

from strata.engine.stats import store_stats
from strata.model.admin import StoreFigures
from strata.server.context import ServerContext


def storage_figures(ctx: ServerContext) -> StoreFigures:
    return StoreFigures(**store_stats(ctx.store).to_dict())

"""Admin API: run retention and prune now, rather than at the next scheduled pass."""

from __future__ import annotations

from fastapi import Depends
from pydantic import JsonValue

from strata.model.roles import Permission
from strata.server.context import ServerContext
from strata.server.deps import admin_router, get_ctx, require
from strata.server.maintenance import run_maintenance

router = admin_router("maintenance")


@router.post("/maintenance", response_model=dict[str, JsonValue])
def maintenance(ctx: ServerContext = Depends(get_ctx),
                actor: str = Depends(require(Permission.PRUNE))) -> dict:
    """Apply the retention policy to every CVD, then prune the store: what was removed."""
    return run_maintenance(ctx, actor=actor)

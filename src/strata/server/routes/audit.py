"""Admin API: the records (audit log, transactions) and storage figures."""

from __future__ import annotations

from fastapi import Depends, Query

from strata.model.admin import AuditEntryInfo, StoreFigures, TransactionInfo
from strata.model.roles import Permission
from strata.server.context import ServerContext
from strata.server.deps import admin_router, get_ctx, require
from strata.server.services import audit, endpoints, storage

router = admin_router("records")


@router.get("/transactions", response_model=list[TransactionInfo],
            dependencies=[Depends(require(Permission.VIEW))])
def transactions(endpoint: str | None = Query(default=None, max_length=64),
                 limit: int = Query(default=100, ge=1, le=audit.MAX_ROWS),
                 ctx: ServerContext = Depends(get_ctx)) -> list[TransactionInfo]:
    return endpoints.transactions(ctx, endpoint, limit)


@router.get("/audit", response_model=list[AuditEntryInfo],
            dependencies=[Depends(require(Permission.AUDIT))])
def audit_log(limit: int = Query(default=100, ge=1, le=audit.MAX_ROWS),
              ctx: ServerContext = Depends(get_ctx)) -> list[AuditEntryInfo]:
    return audit.audit_log(ctx, limit)


@router.get("/stats", response_model=StoreFigures,
            dependencies=[Depends(require(Permission.VIEW))])
def stats(ctx: ServerContext = Depends(get_ctx)) -> StoreFigures:
    return storage.storage_figures(ctx)

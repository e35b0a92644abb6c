"""Admin API: compliance of endpoints with their IT layers."""

from __future__ import annotations

from fastapi import Depends

from strata.model.admin import ComplianceReport
from strata.model.roles import Permission
from strata.server.context import ServerContext
from strata.server.deps import admin_router, get_ctx
from strata.server.services import compliance as compliance_service

router = admin_router("compliance", Permission.VIEW)


@router.get("/compliance", response_model=ComplianceReport)
def compliance(endpoint: str | None = None,
               ctx: ServerContext = Depends(get_ctx)) -> ComplianceReport:
    return compliance_service.compliance_report(ctx, endpoint)

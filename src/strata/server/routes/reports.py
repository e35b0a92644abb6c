"""Reports: installed software (each endpoint's package list, sent by its agent, and the
fleet's "which endpoints have X, at which version") and storage per CVD."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from strata.model.roles import Permission
from strata.model.software import SoftwareReport, SoftwareReportPage, SoftwareStored, StorageReport
from strata.server.catalog.models import Endpoint
from strata.server.context import ServerContext
from strata.server.deps import AGENT_API, admin_router, get_ctx, require_device
from strata.server.services import software
from strata.server.services.storage_report import storage_report_of

router = admin_router("reports", Permission.VIEW)
agent_router = APIRouter(prefix=AGENT_API, tags=["agent"])


@agent_router.post("/software", response_model=SoftwareStored)
def report_software(body: SoftwareReport, ep: Endpoint = Depends(require_device),
                    ctx: ServerContext = Depends(get_ctx)) -> SoftwareStored:
    """The endpoint's installed packages (its own rows only; the whole list replaces the
    last; bounded by the model and the JSON body limit)."""
    return software.store_software(ctx, ep, body)


@router.get("/reports/software", response_model=SoftwareReportPage)
def software_report(package: str = "", endpoint: str = "", limit: int = software.ROWS_LIMIT,
                    ctx: ServerContext = Depends(get_ctx)) -> SoftwareReportPage:
    """Which endpoints have `package` (a name, or a prefix and *), at which version; an
    endpoint's packages; or, with neither, each package with its endpoints and versions."""
    return software.software_report(ctx, package=package[:130], endpoint=endpoint[:64],
                                    limit=limit)


@router.get("/reports/storage", response_model=StorageReport)
def storage_report(ctx: ServerContext = Depends(get_ctx)) -> StorageReport:
    """Per CVD: logical bytes, unique bytes, share of the store (computed at most every
    10 minutes; `computed_at` says when)."""
    report = storage_report_of(ctx).get(wait=True)
    assert report is not None
    return report

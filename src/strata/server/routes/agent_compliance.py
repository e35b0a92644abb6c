"""Agent API: the compliance the agent measured on its live tree."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from strata.model.wire import LiveComplianceReport
from strata.server.catalog.models import Endpoint
from strata.server.context import ServerContext
from strata.server.deps import AGENT_API, get_ctx, require_device
from strata.server.services import live_compliance

router = APIRouter(prefix=AGENT_API, tags=["agent"])


@router.post("/compliance")
def report_compliance(body: LiveComplianceReport, ep: Endpoint = Depends(require_device),
                      ctx: ServerContext = Depends(get_ctx)) -> dict[str, object]:
    """Kept as the endpoint's compliance; a report about layers no longer applied is
    ignored."""
    if not live_compliance.record(ctx, ep, body):
        return {"recorded": False, "reason": "not the applied desired state"}
    return {"recorded": True}

"""Agent API: enrollment and check-in."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from strata.model.wire import CheckinRequest, CheckinResponse, EnrollRequest, EnrollResponse
from strata.server.catalog.models import Endpoint
from strata.server.context import ServerContext
from strata.server.deps import AGENT_API, client_ip, get_ctx, on_loop_if_cached, require_device
from strata.server.services import checkin as checkins
from strata.server.services import credentials

router = APIRouter(prefix=AGENT_API, tags=["agent"])


@router.post("/enroll", response_model=EnrollResponse)
def enroll(body: EnrollRequest, request: Request,
           ctx: ServerContext = Depends(get_ctx)) -> EnrollResponse:
    """Exchange a one-time enrollment token for a device credential."""
    return credentials.enroll(ctx, body, client_ip(request))


@router.post("/checkin", response_model=CheckinResponse)
async def checkin(body: CheckinRequest, request: Request,
                  ep: Endpoint = Depends(require_device),
                  ctx: ServerContext = Depends(get_ctx)) -> CheckinResponse:
    # async: the common check-in touches only caches, so it runs on the event loop
    # instead of paying a thread hand-off; one that must read or write the catalog is
    # run in a worker thread, so that it waits there and not the other requests.
    # An agent's cycle sends its inventory (not `agent status` probing beside the
    # daemon): its credential may be due for rotation.
    presented = request.headers.get("authorization", "").removeprefix("Bearer ").strip() \
        if body.inventory else None
    return await on_loop_if_cached(_answer, ctx, ep, body, client_ip(request), presented)


def _answer(ctx: ServerContext, ep: Endpoint, body: CheckinRequest, ip: str,
            presented: str | None) -> CheckinResponse:
    answer = checkins.checkin(ctx, ep, body, ip)
    if presented is not None:
        answer.credential = credentials.renew_credential(ctx, ep, presented)
    return answer

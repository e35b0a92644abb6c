"""Admin API: policy documents (upload, retention, bandwidth, layers)."""

from __future__ import annotations

from fastapi import Depends, Header, Response

from strata.model.admin import PolicyDocument, PolicyPlan, PolicyPlanRequest, policy_revision
from strata.server.context import ServerContext
from strata.server.deps import admin_router, get_ctx, policy_permission
from strata.server.services import policies

router = admin_router("policies")


@router.get("/policies/{kind}", response_model=PolicyDocument,
            dependencies=[Depends(policy_permission)])
def read_policy(kind: str, response: Response,
                ctx: ServerContext = Depends(get_ctx)) -> PolicyDocument:
    doc = policies.read_policy(ctx, kind)
    response.headers["ETag"] = f'"{policy_revision(doc)}"'
    return doc


def _revision(if_match: str | None) -> str | None:
    """The revision an `If-Match` header names (the ETag of GET, a plan's `revision`):
    the write is refused (409) if the document is no longer at it."""
    if if_match is None or if_match.strip() == "*":
        return None
    return if_match.strip().removeprefix("W/").strip('"')


@router.put("/policies/{kind}", response_model=PolicyDocument)
def write_policy(kind: str, document: PolicyDocument, ctx: ServerContext = Depends(get_ctx),
                 actor: str = Depends(policy_permission),
                 if_match: str | None = Header(None, max_length=80)) -> PolicyDocument:
    return policies.write_policy(ctx, kind, document, actor=actor,
                                 expected=_revision(if_match))


@router.post("/policies/{kind}/plan", response_model=PolicyPlan,
             dependencies=[Depends(policy_permission)])
def plan_policy(kind: str, req: PolicyPlanRequest,
                ctx: ServerContext = Depends(get_ctx)) -> PolicyPlan:
    return policies.plan_policy(ctx, kind, req)


@router.delete("/policies/{kind}", response_model=PolicyDocument)
def reset_policy(kind: str, ctx: ServerContext = Depends(get_ctx),
                 actor: str = Depends(policy_permission),
                 if_match: str | None = Header(None, max_length=80)) -> PolicyDocument:
    return policies.reset_policy(ctx, kind, actor=actor, expected=_revision(if_match))

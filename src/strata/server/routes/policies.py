"""Admin API: policy documents (upload, retention, bandwidth, layers)."""

from __future__ import annotations

from fastapi import Depends

from strata.model.admin import PolicyDocument, PolicyPlan, PolicyPlanRequest
from strata.server.context import ServerContext
from strata.server.deps import admin_router, get_ctx, policy_permission
from strata.server.services import policies

router = admin_router("policies")


@router.get("/policies/{kind}", response_model=PolicyDocument,
            dependencies=[Depends(policy_permission)])
def read_policy(kind: str, ctx: ServerContext = Depends(get_ctx)) -> PolicyDocument:
    return policies.read_policy(ctx, kind)


@router.put("/policies/{kind}", response_model=PolicyDocument)
def write_policy(kind: str, document: PolicyDocument, ctx: ServerContext = Depends(get_ctx),
                 actor: str = Depends(policy_permission)) -> PolicyDocument:
    return policies.write_policy(ctx, kind, document, actor=actor)


@router.post("/policies/{kind}/plan", response_model=PolicyPlan,
             dependencies=[Depends(policy_permission)])
def plan_policy(kind: str, req: PolicyPlanRequest,
                ctx: ServerContext = Depends(get_ctx)) -> PolicyPlan:
    return policies.plan_policy(ctx, kind, req)


@router.delete("/policies/{kind}", response_model=PolicyDocument)
def reset_policy(kind: str, ctx: ServerContext = Depends(get_ctx),
                 actor: str = Depends(policy_permission)) -> PolicyDocument:
    return policies.reset_policy(ctx, kind, actor=actor)

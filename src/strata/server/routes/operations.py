"""Admin API: operations on endpoints (revert, restore to new hardware, provision) and
migrations tracked as tasks."""

from __future__ import annotations

from fastapi import Depends

from strata.model.admin import (
    MigrateRequest,
    ProvisionRequest,
    ProvisionResult,
    RestoreRequest,
    RestoreResult,
    RevertRequest,
    RevertResult,
    TaskInfo,
)
from strata.server.context import ServerContext
from strata.server.deps import admin_router, get_ctx, require_admin
from strata.server.services import operations

router = admin_router("operations")


@router.post("/endpoints/{ref}/revert", response_model=RevertResult)
def revert(ref: str, body: RevertRequest, ctx: ServerContext = Depends(get_ctx),
           actor: str = Depends(require_admin)) -> RevertResult:
    """System layers back to a snapshot; user data stays as it is now."""
    return operations.revert(ctx, ref, body, actor=actor)


@router.post("/endpoints/{ref}/restore", response_model=RestoreResult)
def restore_to(ref: str, body: RestoreRequest, ctx: ServerContext = Depends(get_ctx),
               actor: str = Depends(require_admin)) -> RestoreResult:
    """Full restore of a CVD onto another (new) endpoint."""
    return operations.restore_to(ctx, ref, body, actor=actor)


@router.post("/endpoints/{ref}/provision", response_model=ProvisionResult)
def provision(ref: str, body: ProvisionRequest, ctx: ServerContext = Depends(get_ctx),
              actor: str = Depends(require_admin)) -> ProvisionResult:
    return operations.provision(ctx, ref, body, actor=actor)


@router.post("/migrate", response_model=TaskInfo)
def migrate(body: MigrateRequest, ctx: ServerContext = Depends(get_ctx),
            actor: str = Depends(require_admin)) -> TaskInfo:
    return operations.migrate(ctx, body, actor=actor)


@router.get("/tasks", response_model=list[TaskInfo])
def list_tasks(ctx: ServerContext = Depends(get_ctx)) -> list[TaskInfo]:
    return operations.list_tasks(ctx)


@router.get("/tasks/{tid}", response_model=TaskInfo)
def show_task(tid: int, ctx: ServerContext = Depends(get_ctx)) -> TaskInfo:
    return operations.task_info(ctx, tid)

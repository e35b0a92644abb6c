"""Admin API: operations on endpoints (revert, restore to new hardware, provision),
migrations, and the tracked tasks (list, show, cancel, retry)."""

from __future__ import annotations

from fastapi import Depends

from strata.model.admin import (
    MassProvisionRequest,
    MassRevertRequest,
    MigrateRequest,
    ProvisionRequest,
    ProvisionResult,
    RestoreRequest,
    RestoreResult,
    RevertRequest,
    RevertResult,
    TaskInfo,
)
from strata.model.roles import Permission
from strata.server.context import ServerContext
from strata.server.deps import admin_router, current_staff, get_ctx, require, signing_required
from strata.server.services import operations, tasks
from strata.server.services.users import Staff

router = admin_router("operations")
VIEW = [Depends(require(Permission.VIEW))]


@router.post("/endpoints/{ref}/revert", response_model=RevertResult,
             dependencies=[Depends(require(Permission.REVERT)),
                           Depends(signing_required)])
def revert(ref: str, body: RevertRequest, ctx: ServerContext = Depends(get_ctx),
           actor: str = Depends(require(Permission.REVERT))) -> RevertResult:
    """System layers back to a snapshot; user data stays as it is now."""
    return operations.revert(ctx, ref, body, actor=actor)


@router.post("/endpoints/{ref}/restore", response_model=RestoreResult,
             dependencies=[Depends(require(Permission.RESTORE)),
                           Depends(signing_required)])
def restore_to(ref: str, body: RestoreRequest, ctx: ServerContext = Depends(get_ctx),
               actor: str = Depends(require(Permission.RESTORE))) -> RestoreResult:
    """Full restore of a CVD onto another (new) endpoint."""
    return operations.restore_to(ctx, ref, body, actor=actor)


@router.post("/endpoints/{ref}/provision", response_model=ProvisionResult,
             dependencies=[Depends(require(Permission.PROVISION)),
                           Depends(signing_required)])
def provision(ref: str, body: ProvisionRequest, ctx: ServerContext = Depends(get_ctx),
              actor: str = Depends(require(Permission.PROVISION))) -> ProvisionResult:
    return operations.provision(ctx, ref, body, actor=actor)


@router.post("/migrate", response_model=TaskInfo,
             dependencies=[Depends(require(Permission.MIGRATE)),
                           Depends(signing_required)])
def migrate(body: MigrateRequest, ctx: ServerContext = Depends(get_ctx),
            actor: str = Depends(require(Permission.MIGRATE))) -> TaskInfo:
    return operations.migrate(ctx, body, actor=actor)


@router.post("/tasks/revert", response_model=TaskInfo,
             dependencies=[Depends(require(Permission.REVERT)),
                           Depends(signing_required)])
def revert_task(body: MassRevertRequest, ctx: ServerContext = Depends(get_ctx),
                actor: str = Depends(require(Permission.REVERT))) -> TaskInfo:
    """Revert endpoints or a collection, each to its latest or pre-update snapshot."""
    return operations.revert_task(ctx, body, actor=actor)


@router.post("/tasks/provision", response_model=TaskInfo,
             dependencies=[Depends(require(Permission.PROVISION)),
                           Depends(signing_required)])
def provision_task(body: MassProvisionRequest, ctx: ServerContext = Depends(get_ctx),
                   actor: str = Depends(require(Permission.PROVISION))) -> TaskInfo:
    """Provision endpoints or a collection from layers."""
    return operations.provision_task(ctx, body, actor=actor)


@router.get("/tasks", response_model=list[TaskInfo], dependencies=VIEW)
def list_tasks(ctx: ServerContext = Depends(get_ctx)) -> list[TaskInfo]:
    """Oldest first, with counts by state (each endpoint's progress: GET /tasks/N)."""
    return tasks.list_tasks(ctx)


@router.get("/tasks/{tid}", response_model=TaskInfo, dependencies=VIEW)
def show_task(tid: int, ctx: ServerContext = Depends(get_ctx)) -> TaskInfo:
    return tasks.task_info(ctx, tid)


# Cancel and retry: declared `view`, and refused (403) unless the caller's role may start
# a task of that kind (assign, migrate, revert, provision): see services/tasks.py.
@router.post("/tasks/{tid}/cancel", response_model=TaskInfo, dependencies=VIEW)
def cancel_task(tid: int, ctx: ServerContext = Depends(get_ctx),
                staff: Staff = Depends(current_staff)) -> TaskInfo:
    """Skip the endpoints that have not started; those that have finish."""
    return tasks.cancel(ctx, tid, staff)


@router.post("/tasks/{tid}/retry", response_model=TaskInfo, dependencies=VIEW)
def retry_task(tid: int, ctx: ServerContext = Depends(get_ctx),
               staff: Staff = Depends(current_staff)) -> TaskInfo:
    """Queue the failed and cancelled endpoints again."""
    return tasks.retry(ctx, tid, staff)

"""Admin API: layers (upload a tree's chunks, capture, list, show, diff, delete) and the
dry run of an update."""

from __future__ import annotations

from fastapi import Depends, Request

from strata.model.admin import (
    CaptureConfig,
    Deleted,
    DryRunReport,
    DryRunRequest,
    LayerCaptureRequest,
    LayerDetail,
    LayerDetailWithFiles,
    LayerDiff,
    LayerInfo,
)
from strata.model.roles import Permission
from strata.model.wire import MissingRequest, MissingResponse, UploadResponse
from strata.server.context import ServerContext
from strata.server.deps import admin_router, get_ctx, receive_bundle, require
from strata.server.services import dry_run as dry_runs
from strata.server.services import layers, sync

router = admin_router("layers", Permission.LAYERS)


@router.post("/chunks/missing", response_model=MissingResponse)
def admin_missing(body: MissingRequest, ctx: ServerContext = Depends(get_ctx)) -> MissingResponse:
    """Which chunks of a tree the admin is capturing the server lacks."""
    return MissingResponse(missing=sync.missing_for_admin(ctx, layers.ADMIN_UPLOADS, body.ids))


@router.post("/chunks", response_model=UploadResponse,
             openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}}})
async def admin_upload(request: Request,
                       ctx: ServerContext = Depends(get_ctx)) -> UploadResponse:
    intake = sync.BundleIntake(ctx, layers.ADMIN_UPLOADS, endpoint=False)
    return await receive_bundle(request, intake, ctx.settings.max_upload_bytes)


@router.get("/capture-config", response_model=CaptureConfig)
def capture_config(os_family: str = "linux",
                   ctx: ServerContext = Depends(get_ctx)) -> CaptureConfig:
    """What a client capturing a tree needs: the store's chunker and the layer rules."""
    return layers.capture_config(ctx, os_family)


@router.post("/layers", response_model=LayerInfo)
def capture_layer(body: LayerCaptureRequest, ctx: ServerContext = Depends(get_ctx),
                  actor: str = Depends(require(Permission.LAYERS))) -> LayerInfo:
    return layers.capture(ctx, body, actor=actor)


@router.get("/layers", response_model=list[LayerInfo])
def list_layers(kind: str | None = None,
                ctx: ServerContext = Depends(get_ctx)) -> list[LayerInfo]:
    return layers.list_layers(ctx, kind)


@router.get("/layers/{ref}", response_model=LayerDetailWithFiles | LayerDetail)
def show_layer(ref: str, files: bool = False,
               ctx: ServerContext = Depends(get_ctx)) -> LayerDetail:
    """What the layer is, where it came from, who uses it (and with `files`, its paths)."""
    return layers.show_layer(ctx, ref, files)


@router.get("/layers/{a}/diff/{b}", response_model=LayerDiff)
def diff_layers(a: str, b: str, ctx: ServerContext = Depends(get_ctx)) -> LayerDiff:
    return layers.diff_layers(ctx, a, b)


@router.delete("/layers/{ref}", response_model=Deleted)
def delete_layer(ref: str, ctx: ServerContext = Depends(get_ctx),
                 actor: str = Depends(require(Permission.LAYERS))) -> Deleted:
    return layers.delete_layer(ctx, ref, actor=actor)


@router.post("/layers/dry-run", response_model=DryRunReport)
def dry_run(body: DryRunRequest, ctx: ServerContext = Depends(get_ctx)) -> DryRunReport:
    """What an update would change on an endpoint, and every conflict, before any update."""
    return dry_runs.dry_run(ctx, body)

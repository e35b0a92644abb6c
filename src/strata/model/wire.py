"""Request and response schemas of the HTTP API, shared by server, agent and CLI."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from strata.model.update import UpdateState

MAX_IDS_PER_QUERY = 10_000


class ChunkerSpec(BaseModel):
    min_size: int
    avg_size: int
    max_size: int
    zstd_level: int


class BandwidthLimits(BaseModel):
    upload_kbps: int | None = None  # None: unlimited
    download_kbps: int | None = None


class AgentPolicy(BaseModel):
    interval_seconds: int = 3600
    exclusions: list[str] = Field(default_factory=list)
    bandwidth: BandwidthLimits = Field(default_factory=BandwidthLimits)


class EnrollRequest(BaseModel):
    token: str = Field(min_length=8, max_length=256)
    hostname: str = Field(default="", max_length=255)
    os: str = Field(default="", max_length=64)
    inventory: dict[str, Any] = Field(default_factory=dict)


class EnrollResponse(BaseModel):
    endpoint_id: str
    credential: str
    state: str  # active or pending (waiting for an admin's approval)


class CheckinRequest(BaseModel):
    inventory: dict[str, Any] = Field(default_factory=dict)
    status: dict[str, Any] = Field(default_factory=dict)


class DesiredLayer(BaseModel):
    id: int | None  # None: a CVD snapshot used as the system image (revert, restore)
    kind: str  # base, driver, app, snapshot
    name: str
    version: str
    snapshot: str  # the store snapshot holding its manifest
    removes: list[str] = Field(default_factory=list)


class DesiredState(BaseModel):
    """What IT wants on this endpoint; `key` changes whenever any of it does."""

    key: str
    layers: list[DesiredLayer]  # in merge order: base (or snapshot), drivers, apps
    owned: list[DesiredLayer] | None = None  # IT's layers afterwards (None: `layers`)
    operation: str = "update"  # update, revert, restore, provision
    keep_user_apps: bool = False
    enforce: bool = False  # repair drift at every check-in
    family: str = "linux"
    rules: dict[str, list[str]] = Field(default_factory=dict)


class CheckinResponse(BaseModel):
    endpoint_id: str
    state: str
    policy: AgentPolicy
    chunker: ChunkerSpec
    last_snapshot: str | None = None
    last_snapshot_time: datetime | None = None
    server_time: datetime
    desired: DesiredState | None = None


class MissingRequest(BaseModel):
    ids: list[str] = Field(max_length=MAX_IDS_PER_QUERY)


class MissingResponse(BaseModel):
    missing: list[str]


class UploadResponse(BaseModel):
    chunks: int
    stored: int  # chunks the server did not hold before
    duplicates: int
    bytes_stored: int


class CommitRequest(BaseModel):
    manifest: list[tuple[str, int]]
    manifest_id: str
    paths: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    trigger: str = "scheduled"
    stats: dict[str, Any] = Field(default_factory=dict)
    kind: str = "incremental"  # centralize (first) or incremental
    retries: int = 0
    bytes_on_wire: int = 0
    seconds: float = 0.0


class CommitResponse(BaseModel):
    snapshot: str


class SnapshotSummary(BaseModel):
    id: str
    time: datetime
    trigger: str
    files: int
    bytes_total: int
    bytes_new: int
    tags: list[str]


class ChunkRequest(BaseModel):
    ids: list[str] = Field(max_length=MAX_IDS_PER_QUERY)


class UpdateReport(BaseModel):
    """The agent's progress on its desired state (`key`)."""

    key: str = Field(max_length=64)
    state: UpdateState
    percent: float = Field(default=0.0, ge=0, le=100)
    detail: str = Field(default="", max_length=4000)
    downloaded_bytes: int = Field(default=0, ge=0)
    refused: bool = False  # the agent refused the layers: unsigned, forged or stale


class RestoreReport(BaseModel):
    snapshot: str
    files: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    result: str = "ok"  # ok / failed
    error: str = Field(default="", max_length=2000)
    bytes_on_wire: int = 0

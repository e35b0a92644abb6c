"""Request and response schemas of the admin API, shared by the server (its routes declare
them as `response_model`, so the OpenAPI document is typed) and the CLI's admin client,
as `model/wire.py` is for agents.

Field names and JSON shapes are the API's contract: scripts read `--json` output. Where a
value comes from an endpoint as it reported it (inventory, audit details), it stays an
open JSON document: typing it strictly here would turn a hostile or newer agent's report
into a failure of the admin's view.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from strata.model.names import COLLECTION_NAME, LAYER_NAME, LAYER_VERSION
from strata.model.wire import ChunkerSpec


class AdminModel(BaseModel):
    # `from` is a Python keyword: such fields are declared `from_` with the alias, and
    # written and read under the alias everywhere.
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)


# -- requests ---------------------------------------------------------------------------


class TokenRequest(AdminModel):
    uses: int | None = Field(default=1, ge=1)  # None: unlimited
    expires: str | None = "24h"  # e.g. 30m, 24h, 7d; None: never
    require_approval: bool = False
    purpose: Literal["endpoint", "reflector"] = "endpoint"  # what it enrolls


class TagsRequest(AdminModel):
    tags: list[str] = Field(max_length=64)


class LayerCaptureRequest(AdminModel):
    kind: str
    name: str = Field(min_length=1, max_length=128, pattern=LAYER_NAME)
    version: str = Field(min_length=1, max_length=64, pattern=LAYER_VERSION)
    os: str = "linux"
    match: dict[str, str] = Field(default_factory=dict)
    source: str = Field(default="", max_length=255)
    # An uploaded tree: the manifest (chunks already uploaded) ...
    manifest: list[tuple[str, int]] = Field(default_factory=list)
    manifest_id: str = ""
    # ... for an app layer, already the difference, with what the install removed.
    removes: list[str] = Field(default_factory=list)
    # Or a centralized endpoint: its snapshot (after) and, for an app, the one before.
    endpoint: str = ""
    snapshot: str = ""
    before_snapshot: str = ""


class DryRunRequest(AdminModel):
    endpoint: str
    base: str | None = None
    apps: list[str] | None = None


class CollectionRequest(AdminModel):
    name: str = Field(min_length=1, max_length=128, pattern=COLLECTION_NAME)
    members: list[str] = Field(default_factory=list)
    rule: dict[str, str] = Field(default_factory=dict)  # os, vendor, model, hostname, tag


class AssignRequest(AdminModel):
    endpoints: list[str] = Field(default_factory=list)
    collection: str = ""
    all: bool = False
    base: str | None = None
    apps: list[str] | None = None  # None: leave as is; []: remove all apps
    drivers: list[str] | None = None  # None: leave as is; []: back to "by hardware"
    enforce: bool | None = None


class RevertRequest(AdminModel):
    snapshot: str
    keep_user_apps: bool = False


class RestoreRequest(AdminModel):
    to_endpoint: str
    # The boot set first, usable at once, the rest while the user works (agent/pipeline.py);
    # False: everything downloaded first, switched whole at the next restart.
    pipelined: bool = True


class ProvisionRequest(AdminModel):
    base: str
    apps: list[str] = Field(default_factory=list)


class MassRevertRequest(AdminModel):
    """A revert of many endpoints as one task: each to its own snapshot, `latest` or
    `pre-update` (the newest one its agent took before applying an update)."""

    endpoints: list[str] = Field(default_factory=list)
    collection: str = ""
    snapshot: Literal["latest", "pre-update"] = "pre-update"
    keep_user_apps: bool = False


class MassProvisionRequest(AdminModel):
    endpoints: list[str] = Field(default_factory=list)
    collection: str = ""
    base: str
    apps: list[str] = Field(default_factory=list)


class MigrateRequest(AdminModel):
    endpoints: list[str] = Field(default_factory=list)
    collection: str = ""
    base: str | None = None
    drivers: list[str] | None = None


# -- credentials and endpoints -------------------------------------------------------------


class TokenCreated(AdminModel):
    id: int
    token: str  # shown once: the server keeps only its hash
    uses: int | None
    expires_at: datetime | None
    require_approval: bool
    purpose: str = "endpoint"


class TokenInfo(AdminModel):
    """An enrollment token as listed: never the secret, which only its creator saw."""

    id: int
    created_at: datetime
    uses_left: int | None  # None: unlimited
    expires_at: datetime | None
    require_approval: bool
    revoked: bool
    status: str  # usable, expired, used up, revoked
    enrolled: int  # endpoints enrolled with it
    purpose: str = "endpoint"  # what it enrolls: endpoints or reflectors


class AdminTokenRotated(AdminModel):
    token: str  # the new admin token; the old one is refused from now on
    path: str  # where the server keeps it


class EndpointState(AdminModel):
    id: str
    state: str  # pending, active, revoked


class EndpointTags(AdminModel):
    endpoint: str
    tags: list[str]


class AssignmentStatus(AdminModel):
    """What IT assigned to an endpoint and where the endpoint stands in getting there."""

    state: str  # assigned, downloading, ready, applying, applied, failed
    percent: float
    detail: str
    layers: list[str]  # "KIND NAME:VERSION", in merge order
    applied: list[str]
    operation: str | None  # a one-off operation in progress: revert, restore, provision
    enforce: bool
    downloaded_bytes: int
    task: int | None
    updated_at: datetime


class SnapshotRow(AdminModel):
    id: str
    time: datetime
    trigger: str
    files: int
    bytes_total: int
    bytes_new: int


class TransactionInfo(AdminModel):
    id: int
    endpoint: str
    kind: str  # centralize, incremental, restore
    started: datetime
    finished: datetime | None
    snapshot: str | None
    files_changed: int
    bytes_before_dedup: int
    bytes_after_dedup: int
    bytes_on_wire: int
    seconds: float
    result: str
    retries: int
    error: str


class EndpointSummary(AdminModel):
    id: str
    hostname: str
    os: str
    state: str
    enrolled_at: datetime
    last_seen: datetime | None
    last_ip: str
    last_snapshot: str | None
    snapshots: int
    tags: list[str]
    inventory: dict[str, JsonValue]  # as the agent reports it
    layers: AssignmentStatus | None


class EndpointDetail(EndpointSummary):
    snapshot_list: list[SnapshotRow]  # oldest first
    transactions: list[TransactionInfo]  # the 20 latest, newest first


# -- layers ----------------------------------------------------------------------------------


class CaptureConfig(AdminModel):
    """What a client capturing a tree needs: the store's chunker and the layer rules."""

    chunker: ChunkerSpec
    rules: dict[str, list[str]]  # the family's layer rules: key -> patterns


class LayerBase(AdminModel):
    id: int
    kind: str
    name: str
    version: str
    ref: str  # NAME:VERSION
    snapshot: str
    os: str
    match: dict[str, str]  # driver layers: vendor, model globs


class LayerInfo(LayerBase):
    removes: int  # how many paths the layer deletes (an app's uninstalled files)
    files: int
    bytes: int
    source: str
    created_at: datetime


class LayerDetail(LayerBase):
    removes: list[str]
    files: int
    bytes: int
    source: str
    created_at: datetime
    endpoints: list[str]  # assigned to or applied on


class LayerDetailWithFiles(LayerDetail):
    file_list: list[str]


class DiffCounts(AdminModel):
    added: int
    removed: int
    changed: int
    metadata: int


class LayerDiff(AdminModel):
    from_: str = Field(alias="from")
    to: str
    counts: DiffCounts
    bytes_changed: int
    added: list[str]
    removed: list[str]
    changed: list[str]
    metadata: list[str]


class Deleted(AdminModel):
    deleted: str


class PlanConflict(AdminModel):
    kind: str  # overwrites-user-app, downgrade, user-modified, kept, disk-space, blocked
    path: str
    detail: str


class DryRunReport(AdminModel):
    """What an update would do on an endpoint. Open to more figures: the merge plan may
    report more than these, and they reach the admin as they are."""

    model_config = ConfigDict(extra="allow")

    changes: dict[str, int]  # per action: add, replace, meta, delete
    bytes_to_write: int
    conflicts: dict[str, int]  # per conflict kind
    held: int = 0  # conflicts that hold the update until resolved (account clashes)
    conflict_list: list[PlanConflict]
    endpoint: str
    snapshot: str
    layers: list[str]
    chunks_to_download: int
    free_bytes: int | float | None  # as the agent reported its disks


# -- collections and assignment ------------------------------------------------------------


class CollectionInfo(AdminModel):
    name: str
    rule: dict[str, str]
    members: list[str]  # named members
    endpoints: list[str]  # every active endpoint in it now (members and rule matches)


class AssignResult(AdminModel):
    endpoints: list[str]
    base: str | None
    apps: list[str] | None
    task: int | None = None  # the tracked task (`strata task show N`)


# -- compliance -------------------------------------------------------------------------------


class DriftCounts(AdminModel):
    changed: int
    missing: int
    added: int


class LayerFigures(AdminModel):
    managed: int
    drift: int
    score: float


class EndpointCompliance(AdminModel):
    endpoint: str
    hostname: str
    snapshot: str
    snapshot_time: datetime
    enforce: bool
    score: float
    managed: int
    drift: int
    changed: list[str]
    missing: list[str]
    added: list[str]
    counts: DriftCounts
    layers: dict[str, LayerFigures]
    # "live": measured by the agent on its tree at `measured_at` (newer than the
    # snapshot); "snapshot": from its latest snapshot, as of `snapshot_time`.
    source: str = "snapshot"
    measured_at: datetime | None = None


class ComplianceUnavailable(AdminModel):
    """An endpoint compliance cannot be measured for, and why."""

    endpoint: str
    hostname: str
    state: str  # no layers applied, not centralized


class ComplianceReport(AdminModel):
    endpoints: list[EndpointCompliance | ComplianceUnavailable]
    layers: dict[str, float]  # average score per layer


# -- operations ------------------------------------------------------------------------------


class RevertResult(AdminModel):
    endpoint: str
    snapshot: str
    state: str


class RestoreResult(AdminModel):
    from_: str = Field(alias="from")
    to: str
    snapshot: str
    state: str
    # The CVD's own files that match the do-not-download rule: they come along too (the
    # rule is about layers' content, not the endpoint's own data).
    own_do_not_download: int = 0
    pipelined: bool = False
    boot_set: int = 0  # files learned of the CVD's use that come first
    working_set: int = 0


class ProvisionResult(AdminModel):
    endpoint: str
    base: str
    apps: list[str]
    state: str


class TaskEndpoint(AdminModel):
    endpoint: str
    hostname: str
    # An update state, cancelled, or superseded (a later assignment took over)
    state: str
    percent: float
    detail: str
    attempts: int = 1  # 1 + the retries that put it back in the task


class TaskInfo(AdminModel):
    id: int
    kind: str  # assign, migrate
    params: dict[str, JsonValue]  # what the task was asked to do (the request's fields)
    created_at: datetime
    endpoints: list[TaskEndpoint]  # empty in lists of tasks: see `counts`
    size: int = 0  # how many endpoints
    counts: dict[str, int] = Field(default_factory=dict)  # endpoints by state
    progress: float  # share of endpoints done, in percent
    state: str  # running, done, failed, cancelled


# -- records -------------------------------------------------------------------------------


class AuditEntryInfo(AdminModel):
    time: datetime
    actor: str  # "admin" (break-glass token), "user:NAME", "portal:NAME", "endpoint:ID"
    action: str
    target: str
    detail: dict[str, JsonValue]  # what the action was given; its keys vary by action


class StoreFigures(AdminModel):
    snapshots: int
    logical_bytes: int
    unique_bytes: int
    stored_bytes: int
    chunks: int
    packs: int
    dedup_ratio: float  # logical / unique
    compression_ratio: float  # unique / stored
    space_saving_ratio: float  # logical / stored


# A policy document as stored: its shape depends on its kind (upload, retention,
# bandwidth, layers; see server/policies.py, which validates each).
PolicyDocument = dict[str, JsonValue]


def policy_revision(document: PolicyDocument) -> str:
    """A document's revision: a digest of its content, the same on the server and in the
    CLI. Two administrators who plan against the same revision plan against the same
    document, so `policy set` can refuse to overwrite a change it never showed (changed
    and changed back is the same revision again, and overwriting it loses nothing)."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


class PolicyPlanRequest(AdminModel):
    """A document to merge over the current one (or to replace it with `replace`); no
    document: the kind's default (what `policy reset` puts back)."""

    document: PolicyDocument | None = None
    replace: bool = False


class PolicyChange(AdminModel):
    key: str  # dotted, e.g. exclusions.linux
    before: JsonValue | None  # None: added
    after: JsonValue | None  # None: removed


class RetentionLoss(AdminModel):
    """What a retention document would remove from one endpoint's CVD."""

    endpoint_id: str
    hostname: str
    snapshots: int
    removed: int
    revert_points_removed: int  # pre-update snapshots among them


class PolicyPlan(AdminModel):
    """What storing a policy document would change; nothing is stored."""

    kind: str
    document: PolicyDocument  # what would be stored (merged, validated)
    changes: list[PolicyChange]
    retention: list[RetentionLoss]  # kind retention: endpoints that would lose snapshots
    # The revision of the current document the plan was made against: `policy set` sends
    # it back, and the server refuses to store over a revision nobody reviewed.
    revision: str = ""


class EndpointDeleted(AdminModel):
    """An endpoint deleted with its CVD: its snapshots are gone from the catalog and the
    store (their chunks no other snapshot uses are freed at the next maintenance)."""

    deleted: str
    hostname: str
    snapshots: int

"""Request and response schemas of the HTTP API, shared by server, agent and CLI."""

from __future__ import annotations

import ipaddress
import json
import math
from datetime import datetime, time
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from strata.model.bandwidth import in_window, kbps_to_bytes
from strata.model.ids import is_hex_id
from strata.model.update import UpdateState

MAX_IDS_PER_QUERY = 10_000
# A store object's id (chunk, snapshot, manifest) as it crosses the wire: checked before
# any of them names a file or a URL on either side.
HexId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
MAX_CHUNK_LENGTH = 1 << 30  # a manifest chunk's length as listed (the store caps it lower)
ManifestChunk = tuple[HexId, Annotated[int, Field(gt=0, le=MAX_CHUNK_LENGTH)]]
ShortText = Annotated[str, StringConstraints(max_length=255)]
PathText = Annotated[str, StringConstraints(max_length=4096)]
MAX_STATS_KEYS = 64
# What the server's catalog columns hold (32- and 64-bit integers): numbers outside are
# refused here, before the server writes anything, rather than by the database afterwards.
INT32_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1
MAX_SECONDS = 366 * 86400  # one operation's duration; far more would overflow a datetime
# Counters of a commit's stats that the server copies into the catalog. File counts stay
# below 2^30 so that their sums (files new + changed) fit a 32-bit column too.
CATALOG_STATS = {"files": 1 << 30, "files_new": 1 << 30, "files_changed": 1 << 30,
                 "bytes_total": INT64_MAX, "bytes_new": INT64_MAX, "bytes_read": INT64_MAX}


class ChunkerSpec(BaseModel):
    min_size: int
    avg_size: int
    max_size: int
    zstd_level: int


Kbps = Annotated[int, Field(gt=0, le=INT64_MAX)]  # kilobits per second (model/bandwidth.py)
TimeOfDay = Annotated[str, StringConstraints(
    pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?$")]
MAX_BANDWIDTH_WINDOWS = 100


class BandwidthWindow(BaseModel):
    """One bandwidth rule as an agent receives it: already matched on its site and
    subnet; the agent checks the time window by its own clock."""

    start: TimeOfDay | None = None  # local time of day; no window: always
    end: TimeOfDay | None = None
    upload_kbps: Kbps | None = None  # None: unlimited
    download_kbps: Kbps | None = None


class BandwidthLimits(BaseModel):
    """The caps for this endpoint, in kilobits per second: those in force at check-in
    (in the endpoint's local time), and the rules they come from, so that the agent
    follows the windows through long transfers and between check-ins. `windows` None:
    an older server that sent only the caps."""

    upload_kbps: Kbps | None = None  # None: unlimited
    download_kbps: Kbps | None = None
    windows: list[BandwidthWindow] | None = Field(default=None,
                                                   max_length=MAX_BANDWIDTH_WINDOWS)

    def caps_at(self, local: time) -> tuple[float | None, float | None]:
        """(upload, download) in bytes per second at the endpoint's local time `local`:
        the first rule whose window holds it (first match wins, as on the server)."""
        if self.windows is None:
            return kbps_to_bytes(self.upload_kbps), kbps_to_bytes(self.download_kbps)
        for w in self.windows:
            if in_window(w.start, w.end, local):
                return kbps_to_bytes(w.upload_kbps), kbps_to_bytes(w.download_kbps)
        return None, None


class AgentPolicy(BaseModel):
    interval_seconds: int = 3600
    exclusions: list[str] = Field(default_factory=list)
    bandwidth: BandwidthLimits = Field(default_factory=BandwidthLimits)


MAX_REPORT_BYTES = 64 << 10  # an inventory or status document, as JSON: kept in the catalog


def _bounded_report(doc: dict[str, Any]) -> dict[str, Any]:
    """What an endpoint reports about itself is kept as it is, so its size is bounded."""
    if len(json.dumps(doc)) > MAX_REPORT_BYTES:  # NaN is refused by the catalog's types
        raise ValueError(f"at most {MAX_REPORT_BYTES} bytes as JSON")
    return doc


BoundedReport = Annotated[dict[str, Any], AfterValidator(_bounded_report)]


class EnrollRequest(BaseModel):
    token: str = Field(min_length=8, max_length=256)
    hostname: str = Field(default="", max_length=255)
    os: str = Field(default="", max_length=64)
    inventory: BoundedReport = Field(default_factory=dict)
    # A re-enrollment of the same machine: the credential it held until now, so the new
    # endpoint holds what the old one did (it sends none of its data again).
    previous_credential: str = Field(default="", max_length=512)


class EnrollResponse(BaseModel):
    # It names signed targets and files on the agent: an id, never a path.
    endpoint_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
    credential: str = Field(max_length=512)
    state: str  # active or pending (waiting for an admin's approval)


SiteName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


def _interface(text: str) -> str:
    ipaddress.ip_interface(text)  # ValueError: refused with the request
    return text


# The address and prefix an agent or a reflector reaches the server from ('10.20.3.4/16').
ReportedSubnet = Annotated[str, StringConstraints(max_length=64), AfterValidator(_interface)]


class CheckinRequest(BaseModel):
    inventory: BoundedReport = Field(default_factory=dict)
    status: BoundedReport = Field(default_factory=dict)
    # Where the endpoint is, for the bandwidth rules: the site it was given (`strata agent
    # site`), the address and prefix it reaches the server from (behind NAT the server
    # sees another), and its clock's offset from UTC (windows are in its local time).
    site: SiteName | None = None
    subnet: ReportedSubnet | None = None
    utc_offset_minutes: int | None = Field(default=None, ge=-18 * 60, le=18 * 60)


class DesiredLayer(BaseModel):
    id: int | None  # None: a CVD snapshot used as the system image (revert, restore)
    kind: str  # base, driver, app, snapshot
    name: str
    version: str
    snapshot: str  # the store snapshot holding its manifest
    removes: list[str] = Field(default_factory=list)

    @field_validator("snapshot")
    @classmethod
    def _snapshot_id(cls, sid: str) -> str:
        # The agent names cache files after it: a server's "../x" must never reach a path.
        if not is_hex_id(sid):
            raise ValueError("a layer's snapshot must be a 64-digit lowercase hex id")
        return sid


class DesiredState(BaseModel):
    """What IT wants on this endpoint; `key` changes whenever any of it does."""

    key: str
    layers: list[DesiredLayer]  # in merge order: base (or snapshot), drivers, apps
    owned: list[DesiredLayer] | None = None  # IT's layers afterwards (None: `layers`)
    operation: str = "update"  # update, revert, restore, provision
    keep_user_apps: bool = False
    enforce: bool = False  # repair drift at every check-in
    pipelined: bool = False  # a restore laid down boot set first (agent/pipeline.py)
    family: str = "linux"
    rules: dict[str, list[str]] = Field(default_factory=dict)


ReflectorId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f-]{36}$")]
PemText = Annotated[str, StringConstraints(max_length=8192)]
ReflectorUrl = Annotated[str, StringConstraints(
    pattern=r"^https?://[A-Za-z0-9.\-\[\]:]{1,200}$")]


class ReflectorAssignment(BaseModel):
    """One reflector an agent downloads from first, in the order to try them. Its
    certificate, when it serves HTTPS, is pinned as given here (the server had it from
    the reflector's enrollment)."""

    id: ReflectorId
    url: ReflectorUrl
    tls_cert: PemText = ""


class ReflectorRoute(BaseModel):
    """What a check-in says about reflectors: the ones to use, and the ticket that lets
    this endpoint read its own layers (and snapshots) through them."""

    reflectors: list[ReflectorAssignment] = Field(default_factory=list, max_length=8)
    ticket: str = Field(default="", max_length=16 << 10)
    expires: datetime | None = None


class CheckinResponse(BaseModel):
    endpoint_id: str
    state: str
    policy: AgentPolicy
    chunker: ChunkerSpec
    last_snapshot: str | None = None
    last_snapshot_time: datetime | None = None
    server_time: datetime
    desired: DesiredState | None = None
    # A new device credential (rotation): the agent keeps it in place of the one it used.
    credential: str | None = None
    # The branch reflector(s) to download from first, and the ticket they honour (None:
    # straight from the server; model/reflector.py, docs/reflectors.md).
    reflector: ReflectorRoute | None = None


class MissingRequest(BaseModel):
    ids: list[str] = Field(max_length=MAX_IDS_PER_QUERY)


class MissingResponse(BaseModel):
    missing: list[str]  # send these chunks' bytes
    # Chunks the server may say it holds, but that this endpoint has not shown it has:
    # prove each with a keyed hash under `nonce` (model/possession.py), or upload it.
    prove: list[str] = Field(default_factory=list)
    nonce: str = ""


class ProveResponse(BaseModel):
    accepted: int
    refused: list[str]  # upload these chunks' bytes instead


class UploadResponse(BaseModel):
    chunks: int
    stored: int  # chunks the server did not hold before
    duplicates: int
    bytes_stored: int


class ManifestUploadResponse(BaseModel):
    """A manifest sent as a delta, rebuilt and stored: its chunks, as the commit names
    them (the endpoint now holds them)."""

    manifest: list[tuple[str, int]]
    manifest_id: str


class CommitRequest(BaseModel):
    manifest: list[ManifestChunk] = Field(min_length=1, max_length=MAX_IDS_PER_QUERY)
    manifest_id: HexId
    paths: list[PathText] = Field(default_factory=list, max_length=64)
    tags: list[ShortText] = Field(default_factory=list, max_length=64)
    trigger: str = Field(default="scheduled", max_length=16)
    stats: dict[str, Any] = Field(default_factory=dict, max_length=MAX_STATS_KEYS)
    kind: str = Field(default="incremental", max_length=16)  # centralize (first) / incremental
    retries: int = Field(default=0, ge=0, le=INT32_MAX)
    bytes_on_wire: int = Field(default=0, ge=0, le=INT64_MAX)
    seconds: float = Field(default=0.0, ge=0, le=MAX_SECONDS, allow_inf_nan=False)

    @field_validator("stats")
    @classmethod
    def _catalog_counters(cls, stats: dict[str, Any]) -> dict[str, Any]:
        for key, limit in CATALOG_STATS.items():
            value = stats.get(key, 0)
            if type(value) is not int or not 0 <= value <= limit:
                raise ValueError(f"stats.{key} must be a whole number from 0 to {limit}")
        for key, value in stats.items():  # the rest is kept in the snapshot as it is
            if len(key) > 64 or not (value is None or isinstance(value, bool)
                                     or (isinstance(value, float) and math.isfinite(value))
                                     or (type(value) is int and abs(value) <= INT64_MAX)
                                     or (isinstance(value, str) and len(value) <= 255)):
                raise ValueError(f"stats.{key[:64]} must be a number or a short text")
        return stats


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


MAX_DELTA_FILES = 1024  # files per delta request (their sizes are bounded too)


class DeltaPair(BaseModel):
    """One changed file of a layer update: the content the endpoint holds (its content
    hash) and the content it needs."""

    old: str = Field(min_length=64, max_length=64)
    new: str = Field(min_length=64, max_length=64)


class DeltaGroup(BaseModel):
    """Files that travel as one delta (strata.engine.delta), with how many bytes of their
    new versions' chunks the endpoint lacks."""

    files: list[DeltaPair] = Field(min_length=1, max_length=MAX_DELTA_FILES)
    lacking: int = Field(ge=0, le=INT64_MAX)


class DeltaRequest(BaseModel):
    groups: list[DeltaGroup] = Field(max_length=MAX_DELTA_FILES)


class UpdateReport(BaseModel):
    """The agent's progress on its desired state (`key`)."""

    key: str = Field(max_length=64)
    state: UpdateState
    percent: float = Field(default=0.0, ge=0, le=100)
    detail: str = Field(default="", max_length=4000)
    downloaded_bytes: int = Field(default=0, ge=0, le=INT64_MAX)
    refused: bool = False  # the agent refused the layers: unsigned, forged or stale


class RestoreReport(BaseModel):
    snapshot: str = Field(max_length=64)
    files: int = Field(default=0, ge=0, le=INT32_MAX)
    bytes_written: int = Field(default=0, ge=0, le=INT64_MAX)
    seconds: float = Field(default=0.0, ge=0, le=MAX_SECONDS, allow_inf_nan=False)
    result: str = Field(default="ok", max_length=16)  # ok / failed
    error: str = Field(default="", max_length=2000)
    bytes_on_wire: int = Field(default=0, ge=0, le=INT64_MAX)


# -- compliance measured on the endpoint ---------------------------------------------------

LIVE_PATHS = 50  # drifted paths of each kind an agent names (all are counted)
LIVE_PATH_CHARS = 256  # a longer path is cut (with "…"): the report is for people to read
MAX_LIVE_LAYERS = 64


class DriftCountsWire(BaseModel):
    changed: int = Field(ge=0, le=INT64_MAX)
    missing: int = Field(ge=0, le=INT64_MAX)
    added: int = Field(ge=0, le=INT64_MAX)


class LayerDriftWire(BaseModel):
    managed: int = Field(ge=0, le=INT64_MAX)
    drift: int = Field(ge=0, le=INT64_MAX)


LivePath = Annotated[str, StringConstraints(max_length=LIVE_PATH_CHARS + 1)]


class LiveComplianceReport(BaseModel):
    """Drift of the endpoint's live tree from its applied layers, as the agent measured
    it (agent/live_compliance.py): the counts, the first paths of each kind, the figures
    per layer. `key` is the applied desired state it was measured against; the server
    keeps the report only while that is still the applied one, and computes the scores
    from the counts itself."""

    key: str = Field(max_length=32)
    managed: int = Field(ge=0, le=INT64_MAX)
    counts: DriftCountsWire
    changed: list[LivePath] = Field(default_factory=list, max_length=LIVE_PATHS)
    missing: list[LivePath] = Field(default_factory=list, max_length=LIVE_PATHS)
    added: list[LivePath] = Field(default_factory=list, max_length=LIVE_PATHS)
    layers: dict[Annotated[str, StringConstraints(max_length=300)], LayerDriftWire] = Field(
        default_factory=dict, max_length=MAX_LIVE_LAYERS)

    @field_validator("layers")
    @classmethod
    def _figures_add_up(cls, layers: dict[str, LayerDriftWire]) -> dict[str, LayerDriftWire]:
        for name, figures in layers.items():
            if figures.drift > figures.managed:
                raise ValueError(f"layer {name}: more drift than managed paths")
        return layers

    @model_validator(mode="after")
    def _lists_within_counts(self) -> LiveComplianceReport:
        c = self.counts
        if c.changed + c.missing > self.managed:
            raise ValueError("more changed and missing paths than managed ones")
        for kind in ("changed", "missing", "added"):
            if len(getattr(self, kind)) > getattr(c, kind):
                raise ValueError(f"more {kind} paths listed than counted")
        return self

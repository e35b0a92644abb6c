"""Schemas of the branch reflector: what the server tells an agent about its reflector,
what a reflector and the server say to each other, what an agent reports about a
reflector, and the administrator's view. Shared by server, reflector, agent and CLI."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from strata.model.wire import (
    INT64_MAX,
    MAX_IDS_PER_QUERY,
    BandwidthLimits,
    DeltaRequest,
    HexId,
    PemText,
    ReflectorAssignment,
    ReflectorId,
    ReflectorRoute,
    ReflectorUrl,
    ReportedSubnet,
    SiteName,
)

__all__ = ["ReflectorAssignment", "ReflectorRoute"]

ReflectorName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
STATUSES = ("active", "retired", "quarantined")


# -- the agent's side (ReflectorAssignment and ReflectorRoute: model/wire.py) -------


class ReflectorProblem(BaseModel):
    """An agent went around its reflector for a batch, and why: down (no answer),
    slow (timed out), refused (an error answer), or corrupt (a chunk failed its id)."""

    reflector_id: ReflectorId
    problem: Literal["down", "slow", "refused", "corrupt"]
    detail: str = Field(default="", max_length=500)
    chunk: HexId | None = None  # the chunk that failed its check (corrupt)


MAX_OFFERED = 64  # groups of one delta offer: what one delta ticket may name
MAX_DELTA_BODY = 64 << 20  # a delta is never larger than the files it rebuilds


class DeltaOfferRequest(DeltaRequest):
    """A delta request whose bodies the agent will fetch from its reflector: the groups,
    and the reflectors of its route (the ticket names those the server routes it to)."""

    reflectors: list[ReflectorId] = Field(min_length=1, max_length=8)


class ManifestOfferRequest(BaseModel):
    """A layer manifest's delta against `base` (a layer manifest the endpoint holds), its
    body to be fetched from the agent's reflector."""

    base: HexId
    reflectors: list[ReflectorId] = Field(min_length=1, max_length=8)


class OfferedDelta(BaseModel):
    """One group's delta, by id: the agent fetches the body from its reflector and checks
    it against `id` (and `size`) before using it."""

    old_key: HexId  # the group's keys (strata.engine.delta.group_key)
    new_key: HexId
    new_size: int = Field(ge=0, le=MAX_DELTA_BODY)  # bytes the delta rebuilds
    id: HexId  # BLAKE3 of the delta's body
    size: int = Field(gt=0, le=MAX_DELTA_BODY)  # the body's bytes


class DeltaOffer(BaseModel):
    """The server's answer: the groups that have a delta that pays (the others go by
    chunks) and a short-lived ticket naming exactly those deltas, bound to this endpoint
    and its reflectors. No ticket: no reflector of the request serves this endpoint now
    (the agent asks the server for the bodies)."""

    ticket: str = Field(default="", max_length=16 << 10)
    expires: datetime | None = None
    deltas: list[OfferedDelta] = Field(default_factory=list, max_length=MAX_OFFERED)


# -- the reflector's side ----------------------------------------------------------------


class ReflectorEnrollRequest(BaseModel):
    token: str = Field(min_length=8, max_length=256)
    name: ReflectorName
    url: ReflectorUrl  # where the agents of the branch reach it
    tls_cert: PemText = ""  # its certificate (PEM) when it serves HTTPS


class ReflectorEnrollResponse(BaseModel):
    reflector_id: ReflectorId
    credential: str = Field(max_length=512)
    ticket_key: HexId  # the server's Ed25519 public key for tickets (hex)


class WarmLayer(BaseModel):
    name: str = Field(max_length=200)  # NAME:VERSION, for the reflector's log and status
    snapshot: HexId


class ReflectorConfig(BaseModel):
    """The server's answer to a reflector's poll: whether it is in rotation, the ticket
    key, and the layers its endpoints are assigned (fetched ahead of demand)."""

    reflector_id: ReflectorId
    status: str
    ticket_key: HexId
    warm: list[WarmLayer] = Field(default_factory=list, max_length=1000)
    # The bandwidth rules for the reflector's site and subnet, as an agent's check-in gets
    # them: its fetches over the WAN are capped like every other transfer.
    bandwidth: BandwidthLimits | None = None


class ReflectorChunkRequest(BaseModel):
    """Chunks a reflector fetches from the server: for an endpoint's ticket (a miss it is
    serving now), or for warm-up (no ticket: only layers its endpoints are assigned)."""

    ids: list[HexId] = Field(max_length=MAX_IDS_PER_QUERY)
    ticket: str = Field(default="", max_length=16 << 10)
    snapshot: HexId | None = None  # with a ticket's own CVD: the snapshot read


class ReflectorStats(BaseModel):
    """The reflector's own counters, as it reports them with each poll."""

    model_config = ConfigDict(extra="ignore")
    bytes_from_server: int = Field(default=0, ge=0, le=INT64_MAX)
    bytes_served: int = Field(default=0, ge=0, le=INT64_MAX)
    cache_bytes: int = Field(default=0, ge=0, le=INT64_MAX)
    cache_limit: int = Field(default=0, ge=0, le=INT64_MAX)
    hits: int = Field(default=0, ge=0, le=INT64_MAX)
    misses: int = Field(default=0, ge=0, le=INT64_MAX)
    refused: int = Field(default=0, ge=0, le=INT64_MAX)
    evicted_bytes: int = Field(default=0, ge=0, le=INT64_MAX)
    deltas_from_server: int = Field(default=0, ge=0, le=INT64_MAX)  # delta bodies fetched
    deltas_served: int = Field(default=0, ge=0, le=INT64_MAX)  # and served to agents


class ReflectorPoll(ReflectorStats):
    """A poll: the counters, and where the reflector is (site, the address and prefix it
    reaches the server from, its clock's offset from UTC), checked as an agent's are."""

    site: SiteName | None = None
    subnet: ReportedSubnet | None = None
    utc_offset_minutes: int | None = Field(default=None, ge=-18 * 60, le=18 * 60)


# -- the administrator's view ------------------------------------------------------------


class ReflectorInfo(BaseModel):
    id: str
    name: str
    url: str
    tls_fingerprint: str
    status: str
    status_reason: str
    enrolled_at: datetime
    last_seen: datetime | None
    last_ip: str
    bytes_from_server: int
    chunks_from_server: int
    fallbacks: int
    bad_chunks: int
    stats: ReflectorStats
    rules: list[str] = Field(default_factory=list)  # the policy rules that name it

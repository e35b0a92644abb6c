"""SQLAlchemy 2 models of the catalog. The schema is owned by Alembic migrations; a new
database is created from these models and stamped (catalog/db.py), and
tests/test_catalog.py checks that both build the same schema."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Boolean, ForeignKey, Integer, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from strata.server.catalog.types import BoundedString as Str
from strata.server.catalog.types import (
    CheckedJSON,
    CleanText,
    FiniteFloat,
    Int32,
    Int64,
    UtcDateTime,
)

# Column types come from catalog/types.py, so that SQLite accepts and returns exactly what
# PostgreSQL does; `Str(n, clip=True)` marks descriptive text that is cut, not refused.
# Integer primary keys stay plain: the database numbers them.


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UtcDateTime(), dict: CheckedJSON(), list: CheckedJSON(),
                           float: FiniteFloat()}


class Endpoint(Base):
    __tablename__ = "endpoints"
    id: Mapped[str] = mapped_column(Str(36), primary_key=True)
    hostname: Mapped[str] = mapped_column(Str(255, clip=True), default="")
    os: Mapped[str] = mapped_column(Str(64, clip=True), default="")
    state: Mapped[str] = mapped_column(Str(16), default="active")  # pending/active/revoked
    credential_hash: Mapped[str] = mapped_column(Str(64), unique=True)
    # Device credentials rotate at check-in (services/credentials.py): the one handed out
    # last is accepted, and the one before it until the agent has used the new one (the
    # answer carrying it may have been lost). None: issued before rotation existed.
    credential_issued_at: Mapped[datetime | None] = mapped_column(default=None)
    previous_credential_hash: Mapped[str | None] = mapped_column(
        Str(64), unique=True, index=True, default=None)
    enrolled_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime | None] = mapped_column(default=None)
    last_ip: Mapped[str] = mapped_column(Str(64, clip=True), default="")
    inventory: Mapped[dict] = mapped_column(default=dict)
    bytes_received: Mapped[int] = mapped_column(Int64, default=0)  # from the agent
    bytes_sent: Mapped[int] = mapped_column(Int64, default=0)  # to the agent
    token_id: Mapped[int | None] = mapped_column(ForeignKey("enrollment_tokens.id"))
    # server_default: what its migration gave the rows already there, so that a catalog
    # made from these models equals a migrated one (catalog/db.py, migrate()).
    tags: Mapped[list] = mapped_column(default=list, server_default="[]")


class Cvd(Base):
    """The endpoint's centralized virtual desktop: its snapshot stream (layers later)."""

    __tablename__ = "cvds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("endpoints.id"), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_snapshot: Mapped[str | None] = mapped_column(Str(64), default=None)


class SnapshotRecord(Base):
    __tablename__ = "snapshots"
    id: Mapped[str] = mapped_column(Str(64), primary_key=True)
    cvd_id: Mapped[int] = mapped_column(ForeignKey("cvds.id"), index=True)
    time: Mapped[datetime] = mapped_column()
    trigger: Mapped[str] = mapped_column(Str(16), default="scheduled")
    files: Mapped[int] = mapped_column(Int32, default=0)
    bytes_total: Mapped[int] = mapped_column(Int64, default=0)
    bytes_new: Mapped[int] = mapped_column(Int64, default=0)
    tags: Mapped[list] = mapped_column(default=list)
    # layer ids applied when it was taken (server_default: as for Endpoint.tags)
    layers: Mapped[list] = mapped_column(default=list, server_default="[]")
    # When a restore to new hardware moved it to another CVD: retention protects moved
    # history for the policy's `protect_days` from then (the new machine's own snapshots
    # would otherwise soon push it out of the hourly and daily counts).
    moved_at: Mapped[datetime | None] = mapped_column(default=None)


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(Str(64), unique=True)
    uses_left: Mapped[int | None] = mapped_column(Int32, default=None)  # None: unlimited
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    require_approval: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    # What it enrolls: "endpoint" (agents) or "reflector" (branch reflectors). One kind
    # each, so that a token handed to a hundred laptops cannot register a reflector.
    purpose: Mapped[str] = mapped_column(Str(16), default="endpoint",  # server_default: as
                                         server_default="endpoint")  # for Endpoint.tags


class Reflector(Base):
    """A branch reflector: a chunk cache at a branch office that the agents of its subnets
    and sites download from (services/reflectors.py). It authenticates like an endpoint
    (an enrollment token for a credential) and reads only what tickets allow."""

    __tablename__ = "reflectors"
    id: Mapped[str] = mapped_column(Str(36), primary_key=True)
    name: Mapped[str] = mapped_column(Str(128, clip=True), default="")
    url: Mapped[str] = mapped_column(Str(255))  # where the branch's agents reach it
    tls_cert: Mapped[str] = mapped_column(CleanText, default="")  # PEM, pinned by agents
    tls_fingerprint: Mapped[str] = mapped_column(Str(64), default="")
    status: Mapped[str] = mapped_column(Str(16), default="active")  # /retired/quarantined
    status_reason: Mapped[str] = mapped_column(CleanText, default="")
    credential_hash: Mapped[str] = mapped_column(Str(64), unique=True)
    token_id: Mapped[int | None] = mapped_column(ForeignKey("enrollment_tokens.id"))
    enrolled_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime | None] = mapped_column(default=None)
    last_ip: Mapped[str] = mapped_column(Str(64, clip=True), default="")
    # Counted by the server: what it sent the reflector, and what agents reported of it.
    bytes_from_server: Mapped[int] = mapped_column(Int64, default=0)
    chunks_from_server: Mapped[int] = mapped_column(Int64, default=0)
    fallbacks: Mapped[int] = mapped_column(Int64, default=0)  # agents that went around it
    bad_chunks: Mapped[int] = mapped_column(Int64, default=0)  # reported failing their id
    stats: Mapped[dict] = mapped_column(default=dict)  # as the reflector reports them


class Policy(Base):
    """A named policy document: upload (exclusions, interval), retention, bandwidth."""

    __tablename__ = "policies"
    kind: Mapped[str] = mapped_column(Str(32), primary_key=True)
    document: Mapped[dict] = mapped_column(default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Transaction(Base):
    """One centralization, incremental upload or restore, as the server saw it."""

    __tablename__ = "transactions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("endpoints.id"), index=True)
    kind: Mapped[str] = mapped_column(Str(16))  # centralize / incremental / restore
    started: Mapped[datetime] = mapped_column(default=utcnow)
    finished: Mapped[datetime | None] = mapped_column(default=None)
    snapshot: Mapped[str | None] = mapped_column(Str(64), default=None)
    files_changed: Mapped[int] = mapped_column(Int32, default=0)
    bytes_before_dedup: Mapped[int] = mapped_column(Int64, default=0)
    bytes_after_dedup: Mapped[int] = mapped_column(Int64, default=0)
    bytes_on_wire: Mapped[int] = mapped_column(Int64, default=0)
    seconds: Mapped[float] = mapped_column(default=0.0)
    result: Mapped[str] = mapped_column(Str(16), default="running")  # ok / failed
    retries: Mapped[int] = mapped_column(Int32, default=0)
    error: Mapped[str] = mapped_column(CleanText, default="")


class AuditEntry(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(Str(64, clip=True))  # admin, user:NAME, endpoint:ID...
    action: Mapped[str] = mapped_column(Str(64, clip=True))
    target: Mapped[str] = mapped_column(Str(128, clip=True), default="")
    detail: Mapped[dict] = mapped_column(default=dict)


class Layer(Base):
    """One IT-managed layer: a base image, a driver set or an application. Its manifest
    lives in the store as a snapshot, so its chunks are shared with every CVD."""

    __tablename__ = "layers"
    __table_args__ = (UniqueConstraint("name", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(Str(16))  # base / driver / app
    name: Mapped[str] = mapped_column(Str(128))
    version: Mapped[str] = mapped_column(Str(64))
    snapshot: Mapped[str] = mapped_column(Str(64))
    os: Mapped[str] = mapped_column(Str(16), default="linux")  # rules family
    match: Mapped[dict] = mapped_column(default=dict)  # drivers: {"vendor": glob, "model": glob}
    removes: Mapped[list] = mapped_column(default=list)  # app layers: paths it deletes
    files: Mapped[int] = mapped_column(Int32, default=0)
    bytes: Mapped[int] = mapped_column(Int64, default=0)
    source: Mapped[str] = mapped_column(Str(255), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Collection(Base):
    """A named group of endpoints: listed members, and/or a rule on OS, hardware, tag."""

    __tablename__ = "collections"
    name: Mapped[str] = mapped_column(Str(128), primary_key=True)
    members: Mapped[list] = mapped_column(default=list)
    rule: Mapped[dict] = mapped_column(default=dict)  # {"os": glob, "vendor": .., "tag": ..}
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Assignment(Base):
    """What IT wants on one endpoint, and where the endpoint stands in getting there."""

    __tablename__ = "assignments"
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("endpoints.id"), primary_key=True)
    base_id: Mapped[int | None] = mapped_column(ForeignKey("layers.id"), default=None)
    app_ids: Mapped[list] = mapped_column(default=list)
    driver_ids: Mapped[list | None] = mapped_column(default=None)  # None: by hardware
    enforce: Mapped[bool] = mapped_column(Boolean, default=False)
    # One-off operation on top of the layers: {"kind": revert|provision|restore, ...}
    operation: Mapped[dict] = mapped_column(default=dict)
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"), default=None)
    state: Mapped[str] = mapped_column(Str(16), default="assigned")
    percent: Mapped[float] = mapped_column(default=0.0)
    detail: Mapped[str] = mapped_column(CleanText, default="")
    desired_key: Mapped[str] = mapped_column(Str(32), default="")
    applied_key: Mapped[str] = mapped_column(Str(32), default="")
    applied_layers: Mapped[list] = mapped_column(default=list)  # layer ids now on the endpoint
    downloaded_bytes: Mapped[int] = mapped_column(Int64, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Task(Base):
    """A tracked operation over many endpoints (a migration), with a snapshot of each."""

    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(Str(32))
    params: Mapped[dict] = mapped_column(default=dict)
    endpoints: Mapped[list] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class User(Base):
    """An IT staff account: a role (model/roles.py), a password for the console, and
    personal API tokens for the CLI and scripts."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(Str(64), unique=True)
    role: Mapped[str] = mapped_column(Str(32))
    password_hash: Mapped[str] = mapped_column(Str(255), default="")  # "": no console login
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Login throttling, in the catalog so that every server process sees the same count.
    failed_logins: Mapped[int] = mapped_column(Int32, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(default=None)


class UserToken(Base):
    """A personal API token (shown once; the catalog keeps its SHA-256)."""

    __tablename__ = "user_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"),
                                         index=True)
    token_hash: Mapped[str] = mapped_column(Str(64), unique=True)
    label: Mapped[str] = mapped_column(Str(128, clip=True), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used: Mapped[datetime | None] = mapped_column(default=None)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class UserSession(Base):
    """A console sign-in: the cookie's SHA-256, its CSRF token, and when it ends."""

    __tablename__ = "user_sessions"
    id: Mapped[str] = mapped_column(Str(64), primary_key=True)  # SHA-256 of the cookie
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"),
                                         index=True)
    csrf: Mapped[str] = mapped_column(Str(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()


class PortalAccount(Base):
    """An end user of the file portal: their own endpoint's snapshots, their own folder
    in them (`home`, e.g. home/alice or Users/alice), nothing else."""

    __tablename__ = "portal_accounts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(Str(64), unique=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("endpoints.id", ondelete="CASCADE"),
                                             index=True)
    home: Mapped[str] = mapped_column(Str(1024))
    password_hash: Mapped[str] = mapped_column(Str(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    failed_logins: Mapped[int] = mapped_column(Int32, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(default=None)


class PortalSession(Base):
    """A file portal sign-in (like UserSession, for a portal account)."""

    __tablename__ = "portal_sessions"
    id: Mapped[str] = mapped_column(Str(64), primary_key=True)  # SHA-256 of the cookie
    account_id: Mapped[int] = mapped_column(
        ForeignKey("portal_accounts.id", ondelete="CASCADE"), index=True)
    csrf: Mapped[str] = mapped_column(Str(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()


class LiveCompliance(Base):
    """The compliance an agent last measured on its live tree against its applied layers
    (agent/live_compliance.py): newer than its latest snapshot, it is what `strata
    compliance` reports. Only for the applied state it was measured against."""

    __tablename__ = "live_compliance"
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("endpoints.id", ondelete="CASCADE"),
                                             primary_key=True)
    applied_key: Mapped[str] = mapped_column(Str(32))
    measured_at: Mapped[datetime] = mapped_column()  # the server's clock, when received
    report: Mapped[dict] = mapped_column()  # model.wire.LiveComplianceReport, validated


class TaskMember(Base):
    """One endpoint of a task: its assignment before the task (`previous`, what a cancel
    puts back), the one the task gives it (`target`, what a retry puts again), and whether
    it was cancelled. Its progress is its assignment's while the assignment is the task's."""

    __tablename__ = "task_members"
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"),
                                         primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("endpoints.id", ondelete="CASCADE"),
                                             primary_key=True, index=True)
    state: Mapped[str] = mapped_column(Str(16), default="queued")  # queued / cancelled
    previous: Mapped[dict] = mapped_column(default=dict)
    target: Mapped[dict] = mapped_column(default=dict)
    attempts: Mapped[int] = mapped_column(Int32, default=1)


class SoftwareList(Base):
    """An endpoint's installed-package list as last reported: its digest (the agent sends
    the list again only when it changes) and when."""

    __tablename__ = "software_lists"
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("endpoints.id", ondelete="CASCADE"),
                                             primary_key=True)
    digest: Mapped[str] = mapped_column(Str(64))
    packages: Mapped[int] = mapped_column(Int32, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class InstalledPackage(Base):
    """One installed package on one endpoint (dpkg or rpm), indexed by name for the
    fleet-wide question "which endpoints have X, at which version"."""

    __tablename__ = "installed_packages"
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("endpoints.id", ondelete="CASCADE"),
                                             primary_key=True)
    name: Mapped[str] = mapped_column(Str(128), primary_key=True, index=True)
    arch: Mapped[str] = mapped_column(Str(32), primary_key=True)
    version: Mapped[str] = mapped_column(Str(128))
    manager: Mapped[str] = mapped_column(Str(8))  # dpkg / rpm


class UsageSet(Base):
    """What an endpoint learned about its own use (model/usage.py): the files it reads at
    boot and first login, and those its user works with. A restore of its CVD onto new
    hardware lays them down first; the sets move with the CVD."""

    __tablename__ = "usage_sets"
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("endpoints.id", ondelete="CASCADE"),
                                             primary_key=True)
    boot: Mapped[list] = mapped_column(default=list)
    working: Mapped[list] = mapped_column(default=list)
    boots_seen: Mapped[int] = mapped_column(Int32, default=0)
    learned_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

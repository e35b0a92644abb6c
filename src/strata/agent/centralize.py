"""Centralization: one pass of the sync protocol, built on the shared backup engine."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from strata.agent.client import ServerClient, parse_answer
from strata.agent.inventory import collect_inventory
from strata.agent.location import local_subnet, read_site, utc_offset_minutes
from strata.agent.manifest_delta import desired_manifests, pick_base, send_manifest_delta
from strata.agent.reflector_source import save_route
from strata.agent.sink import HeldChunks, RemoteSink
from strata.agent.state import AgentState
from strata.agent.update import LocalTree
from strata.engine.backup import archive_tree, commit_with_heal, make_snapshot, store_manifest
from strata.engine.progress import Progress
from strata.errors import MissingChunks, StrataError
from strata.model.entry import Entry, EntryType
from strata.model.manifest import decode_manifest
from strata.model.wire import AgentPolicy, CheckinResponse, ChunkerSpec
from strata.store.chunker import ChunkerParams
from strata.tree.excludes import ExcludeMatcher
from strata.tree.scan import scan_tree


@dataclass
class CentralizeResult:
    snapshot: str
    kind: str  # centralize (the first) or incremental
    files: int = 0
    files_changed: int = 0
    bytes_read: int = 0  # read from disk (files the files cache could not skip)
    bytes_total: int = 0
    bytes_new: int = 0  # raw bytes the server lacked (what dedup could not save)
    bytes_uploaded: int = 0  # those bytes compressed, as sent in bundles
    chunks_uploaded: int = 0
    chunks_proven: int = 0  # held by others: shown by a keyed hash instead of sent
    bytes_sent: int = 0  # everything on the wire, requests and headers included
    bytes_received: int = 0
    retries: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    mounts_skipped: list[str] = field(default_factory=list)  # one file system: not walked

    def to_dict(self) -> dict:
        return asdict(self)


Clock = Callable[[], float]  # seconds since the epoch (time.time, or a test's)


def iso(clock: Clock) -> str:
    return datetime.fromtimestamp(clock(), UTC).isoformat()


def checkin(client: ServerClient, root: Path, state: AgentState, *,
            clock: Clock = time.time) -> CheckinResponse:
    status = state.status()
    body = {"inventory": collect_inventory(root, state.path / "hardware.json"),
            "status": {**{k: status.get(k) for k in ("last_centralization", "pending_work")},
                       "applied_key": state.applied_key()},
            # Where it is, for the bandwidth rules (agent/location.py).
            "site": read_site(state.path), "subnet": local_subnet(client.server),
            "utc_offset_minutes": utc_offset_minutes(clock())}
    # Few retries: an unreachable server means "offline, try next cycle", not a stall.
    resp = client.request("POST", "/api/v1/agent/checkin", json=body, retries=2)
    info = parse_answer(resp, CheckinResponse)
    adopt_credential(client, state, info.credential)
    save_route(state, info.reflector)  # where layer downloads go first
    state.update_status(server_reachable=True, access="ok", last_checkin=iso(clock),
                        policy=info.policy.model_dump(), chunker=info.chunker.model_dump())
    return info


def adopt_credential(client: ServerClient, state: AgentState, new: str | None) -> None:
    """Keep the device credential a check-in handed out (rotation) and use it at once.
    The old one stays valid on the server until the new one is presented, so a crash
    before the file is replaced loses nothing."""
    if not new:
        return
    state.save_credential(dataclasses.replace(state.credential(), credential=new))
    client.http.headers["Authorization"] = f"Bearer {new}"


def own_exclusions(root: Path, state: AgentState) -> list[str]:
    """The agent's state directory and its apply work area are never centralized."""
    own = ["/.strata-apply/"]
    try:
        rel = Path(os.path.realpath(state.path)).relative_to(os.path.realpath(root))
    except ValueError:
        return own
    return own + [f"/{rel.as_posix()}/"] if str(rel) != "." else own


def local_tree(root: Path, state: AgentState, info: CheckinResponse | None) -> LocalTree:
    """The tree as this agent snapshots it, from the check-in just made or, offline, from
    the last one (an apply at boot may have no server)."""
    if info is not None:
        policy, spec = info.policy, info.chunker
    else:
        status = state.status()
        try:
            policy = AgentPolicy.model_validate(status.get("policy") or {})
            spec = ChunkerSpec.model_validate(status["chunker"])
        except (KeyError, ValueError):
            raise StrataError("this agent has not checked in with the server yet") from None
    return LocalTree(root=root, excludes=policy.exclusions + own_exclusions(root, state),
                     chunker=ChunkerParams(spec.min_size, spec.avg_size, spec.max_size),
                     one_file_system=state.credential().stays_on_root_fs)


def estimate_totals(progress: Progress, parent: bytes | None, root: Path, excludes: list[str],
                    *, one_file_system: bool) -> None:
    """Totals for a bar's ETA: the last snapshot's (a tree changes little between two),
    or, for a first centralization, a stat-only count of the tree beside the work."""
    def count(entries: Iterable[Entry]) -> None:
        files = size = 0
        for e in entries:
            if e.type is EntryType.FILE:
                files += 1
                size += e.size
        progress.total_files, progress.total_bytes = files, size
    if parent:
        count(decode_manifest([parent]))
        return
    def walk() -> None:
        with contextlib.suppress(OSError, StrataError):  # only an estimate
            count(e for e, _ in scan_tree(root, ExcludeMatcher(excludes),
                                          one_file_system=one_file_system))
    threading.Thread(target=walk, daemon=True, name="count-tree").start()


def centralize(client: ServerClient, state: AgentState, root: Path, info: CheckinResponse, *,
               trigger: str = "scheduled", tags: list[str] | None = None,
               progress: Progress | None = None, clock: Clock = time.time) -> CentralizeResult:
    started = time.monotonic()
    sent0, recv0, retried0 = client.bytes_sent, client.bytes_received, client.retried
    # Chunks of the last snapshot are the endpoint's already (committed, or inherited by
    # a re-enrolled machine), and so are those of the layers its desired state names: a
    # file read again for a new ctime or inode (a restored, cloned or updated disk) costs
    # no question about them. Should one have gone meanwhile, the commit says so and it
    # is sent then (commit_with_heal).
    _, parent_bytes = state.parent()
    held = [m for m in [parent_bytes, *desired_manifests(state, info)] if m]
    sink = RemoteSink(client, info.chunker, held=HeldChunks(held) if held else None)
    try:
        return _centralize(client, state, root, info, sink, trigger=trigger, tags=tags,
                           progress=progress, started=started, sent0=sent0, recv0=recv0,
                           retried0=retried0, clock=clock)
    finally:
        sink.close()


def _centralize(client: ServerClient, state: AgentState, root: Path, info: CheckinResponse,
                sink: RemoteSink, *, trigger: str, tags: list[str] | None,
                progress: Progress | None, started: float, sent0: int, recv0: int,
                retried0: int, clock: Clock) -> CentralizeResult:
    parent_id, parent_bytes = state.parent()
    parent_entries = decode_manifest([parent_bytes]) if parent_bytes else None
    kind = "incremental" if info.last_snapshot else "centralize"
    excludes = info.policy.exclusions + own_exclusions(root, state)
    one_fs = state.credential().stays_on_root_fs
    if progress is not None and progress.watched and progress.total_bytes is None:
        estimate_totals(progress, parent_bytes, root, excludes, one_file_system=one_fs)
    archive = archive_tree(sink, root, parent_entries=parent_entries, excludes=excludes,
                           progress=progress, one_file_system=one_fs,
                           stat_keys=False, manifest_to_sink=False)
    # The manifest as a delta against the last one, else by chunks (agent/manifest_delta.py).
    if not send_manifest_delta(client, pick_base(state, info), archive):
        store_manifest(sink, archive.manifest_bytes)
    sink.flush()
    # The sink, not the engine, knows what the server lacked: record its figures.
    archive.result.bytes_new = sink.raw_uploaded
    archive.result.bytes_stored = sink.payload_uploaded
    archive.result.chunks_new = sink.chunks_uploaded
    snap = make_snapshot(archive, host=info.endpoint_id, paths=[str(root)], tags=tags,
                         parent=parent_id, trigger=trigger)
    result: dict = {}

    def commit() -> None:
        body = {"manifest": snap.manifest, "manifest_id": snap.manifest_id,
                "paths": snap.paths, "tags": snap.tags, "trigger": trigger,
                "stats": snap.stats, "kind": kind, "retries": client.retried - retried0,
                "bytes_on_wire": client.bytes_sent - sent0,
                "seconds": round(time.monotonic() - started, 3)}
        resp = client.request("POST", "/api/v1/agent/snapshots", json=body)
        if resp.status_code == 409:
            missing = {bytes.fromhex(h) for h in resp.json()["missing"]}
            sink.forget(missing)
            raise MissingChunks(sorted(missing))
        result["snapshot"] = resp.json()["snapshot"]

    commit_with_heal(commit, sink, root, archive.manifest_bytes)
    state.save_parent(result["snapshot"], archive.local_manifest)
    r = archive.result
    out = CentralizeResult(
        snapshot=result["snapshot"], kind=kind, files=r.files,
        files_changed=r.files_new + r.files_changed, bytes_read=r.bytes_read,
        bytes_total=r.bytes_total, bytes_new=sink.raw_uploaded,
        bytes_uploaded=sink.payload_uploaded, chunks_uploaded=sink.chunks_uploaded,
        chunks_proven=sink.chunks_proven,
        bytes_sent=client.bytes_sent - sent0, bytes_received=client.bytes_received - recv0,
        retries=client.retried - retried0, seconds=round(time.monotonic() - started, 3),
        errors=r.errors, mounts_skipped=r.mounts_skipped)
    # Any centralization pays what was owed (an offline `agent backup`, a missed interval).
    owed = [w for w in state.status().get("pending_work", []) if w != "centralize"]
    state.update_status(last_centralization={
        "time": iso(clock), "snapshot": out.snapshot, "result": "partial" if r.errors else "ok",
        "kind": kind, "bytes_sent": out.bytes_sent}, pending_work=owed)
    return out

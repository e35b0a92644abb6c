"""Compliance measured on the endpoint's live tree, not its last snapshot: the tree as it
is now against the IT layers applied on it, with the engine the server uses for
snapshots (layers/compliance.py). Cheap enough for every few check-ins: a stat-only walk
against the last snapshot's manifest, and only the files that changed since are read
and hashed (agent/update.current_entries); the layers' manifests come from the agent's
cache, verified when they were downloaded. The agent reports the result to the server,
so that `strata compliance` shows drift before the next backup, and `strata agent
compliance` prints it on the endpoint (exit 1 on drift)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from strata.agent.client import ServerClient
from strata.agent.signing import approve_update
from strata.agent.state import AgentState
from strata.agent.update import LayerSource, LocalTree, UpdateFailed, live_entries
from strata.layers.compliance import ComplianceReport, check_compliance
from strata.layers.image import LayerContent, build_image
from strata.layers.rules import LayerRules
from strata.model.ids import is_hex_id
from strata.model.manifest import decode_manifest
from strata.model.wire import (
    LIVE_PATH_CHARS,
    LIVE_PATHS,
    MAX_LIVE_LAYERS,
    DesiredLayer,
    DesiredState,
    DriftCountsWire,
    LayerDriftWire,
    LiveComplianceReport,
)

MEASURE_SECONDS = 300.0  # between two measurements when the cycle changed nothing


@dataclass
class LiveCompliance:
    key: str  # the applied desired state it was measured against
    measured_at: str  # ISO 8601 UTC
    report: ComplianceReport
    recorded: bool = False  # the server kept it
    bytes_read: int = 0  # to hash the files changed since the last snapshot (only those)

    def summary(self) -> dict:
        r = self.report
        return {"key": self.key, "time": self.measured_at, "score": r.score,
                "drift": r.drift, "managed": r.managed, "bytes_read": self.bytes_read,
                "counts": {"changed": len(r.changed), "missing": len(r.missing),
                           "added": len(r.added)}}

    def to_dict(self) -> dict:
        return {**self.summary(), "recorded": self.recorded,
                **{k: v for k, v in self.report.to_dict().items()
                   if k in ("changed", "missing", "added", "layers")}}


def _layer_contents(state: AgentState, client: ServerClient | None, tree: LocalTree,
                    desired: DesiredState, layers: list[DesiredLayer]) -> list[LayerContent]:
    """The applied layers' contents: from the cache when every manifest is there (each
    was verified against its signed digest before it was kept), else through a
    LayerSource, which verifies what it fetches."""
    cached = []
    for dl in layers:
        if not is_hex_id(dl.snapshot):  # it names a file: never a path from the server
            raise UpdateFailed(f"layer {dl.name}:{dl.version}: the server named its "
                               "snapshot with something other than an id: refused")
        path = state.path / "layers" / f"{dl.snapshot}.manifest"
        if not path.exists():
            break
        cached.append(LayerContent(label=f"{dl.kind} {dl.name}:{dl.version}", kind=dl.kind,
                                   entries=decode_manifest([path.read_bytes()]),
                                   removes=[os.fsencode(p) for p in dl.removes]))
    else:
        return cached
    if client is None:
        raise UpdateFailed(f"the manifests of the applied layers are not cached here and "
                           f"the server is unreachable: compliance is measured once it "
                           f"answers (missing: {layers[len(cached)].name})")
    source = LayerSource(client, state, tree.root,
                         approval=approve_update(client, state, desired, tree.root))
    try:
        return source.contents(layers)
    finally:
        source.close()


def measure(state: AgentState, tree: LocalTree, desired: DesiredState,
            client: ServerClient | None, *, now: float | None = None) -> LiveCompliance:
    """The live tree's drift from the layers `desired` (the applied state) puts there."""
    rules = LayerRules.from_doc(desired.rules, desired.family)
    # After a revert or a restore, IT's layers are `owned`: the snapshot laid down the
    # system, and what IT manages from then on is those layers.
    layers = desired.owned if desired.owned is not None else desired.layers
    image = build_image(_layer_contents(state, client, tree, desired, layers), rules)
    entries, read = live_entries(state, tree)
    report = check_compliance(entries, image, rules)
    when = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return LiveCompliance(key=desired.key, report=report, bytes_read=read,
                          measured_at=when.isoformat(timespec="seconds"))


def _cut(path: str) -> str:
    return path if len(path) <= LIVE_PATH_CHARS else path[:LIVE_PATH_CHARS] + "…"


def wire_report(live: LiveCompliance) -> LiveComplianceReport:
    r = live.report
    return LiveComplianceReport(
        key=live.key, managed=r.managed,
        counts=DriftCountsWire(changed=len(r.changed), missing=len(r.missing),
                               added=len(r.added)),
        changed=[_cut(p) for p in r.changed[:LIVE_PATHS]],
        missing=[_cut(p) for p in r.missing[:LIVE_PATHS]],
        added=[_cut(p) for p in r.added[:LIVE_PATHS]],
        layers={name[:300]: LayerDriftWire(managed=f["managed"], drift=f["drift"])
                for name, f in list(r.per_layer.items())[:MAX_LIVE_LAYERS]})


def report(client: ServerClient, live: LiveCompliance) -> LiveCompliance:
    resp = client.request("POST", "/api/v1/agent/compliance", retries=1,
                          json=wire_report(live).model_dump(mode="json"))
    try:
        live.recorded = bool(resp.json().get("recorded"))
    except (ValueError, AttributeError):
        live.recorded = False
    return live


def due(state: AgentState, key: str, now: float, *, changed: bool) -> bool:
    """Measure when the cycle changed the tree or the layers, when the applied state is
    not the one last measured, and otherwise every MEASURE_SECONDS."""
    last = state.status().get("compliance") or {}
    if changed or last.get("key") != key:
        return True
    try:
        then = datetime.fromisoformat(last["time"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return True
    return now - then >= MEASURE_SECONDS or now < then


def measure_and_report(client: ServerClient, state: AgentState, tree: LocalTree,
                       desired: DesiredState, *, now: float | None = None) -> LiveCompliance:
    """One measurement, reported to the server and summed up in the agent's status."""
    started = time.monotonic()
    live = report(client, measure(state, tree, desired, client, now=now))
    state.update_status(compliance={**live.summary(),
                                    "seconds": round(time.monotonic() - started, 3)})
    return live


def applied_state(state: AgentState, desired: DesiredState | None) -> DesiredState | None:
    """What to measure against: the check-in's desired state when it is the applied one
    (its layer rules are the current ones), else the one saved when it was applied;
    None when no IT layers are applied here."""
    key = state.applied_key()
    if not key:
        return None
    if desired is not None and desired.key == key:
        return desired
    saved = state.applied_desired()
    if saved is None:
        return None
    try:
        return DesiredState.model_validate(saved)
    except ValueError:
        return None

"""The agent's work, as the `strata agent` commands ask for it: one cycle (finish an
interrupted apply, check in, centralize when due or owed, follow the layer assignment)
and the apply a restart runs (the status is in agent/status.py). Each returns a typed
result; the CLI only parses arguments and prints those. Time comes from the context's
clock, so that due and interval decisions are tested without waiting."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from strata.agent import live_compliance
from strata.agent.access import Access, AccessDenied, DeviceClient, ExitCode, device_client
from strata.agent.centralize import (
    CentralizeResult,
    Clock,
    centralize,
    checkin,
    local_tree,
    own_exclusions,
)
from strata.agent.client import ServerClient, ServerUnreachable
from strata.agent.drift import tree_changed
from strata.agent.live_compliance import LiveCompliance
from strata.agent.notify import prompt_restart, ready_detail
from strata.agent.software import report_software
from strata.agent.state import AgentState, Credential
from strata.agent.update import (
    Centralizer,
    LocalTree,
    UpdateResult,
    appliable,
    apply_update,
    on_checkin,
    recover,
)
from strata.agent.usage import SessionClock, learn_and_report, send_with
from strata.engine.progress import Progress
from strata.errors import StrataError
from strata.model.update import UpdateState
from strata.model.wire import BandwidthLimits, CheckinResponse

T = TypeVar("T")
CENTRALIZE = "centralize"  # the one kind of pending work so far
DEFAULT_INTERVAL = 3600  # until the server has said otherwise


class WithProgress(Protocol):
    """Runs `work`, showing its progress under `label` (the CLI draws a bar)."""

    def __call__(self, label: str, work: Callable[[Progress], T]) -> T: ...


def no_progress(label: str, work: Callable[[Progress], T]) -> T:
    return work(Progress())


@dataclass
class AgentContext:
    """What every command works with: the state directory and its credential, the local
    upload cap, the clock, and how to show progress."""

    state: AgentState
    credential: Credential
    upload_rate: float | None = None  # --limit-upload, bytes per second
    clock: Clock = time.time
    with_progress: WithProgress = no_progress
    sleep: Callable[[float], None] = time.sleep  # the backoff between retries (injected)

    @classmethod
    def load(cls, state: AgentState, **options: Any) -> AgentContext:
        return cls(state, state.credential(), **options)

    @property
    def root(self) -> Path:
        return Path(self.credential.root)

    def client(self, **options: Any) -> DeviceClient:
        # Read again: the server may have rotated the credential since it was loaded (at
        # a check-in of this daemon, or of `agent status` beside it).
        with contextlib.suppress(StrataError):
            self.credential = self.state.credential()
        return device_client(self.credential, upload_rate=self.upload_rate,
                             sleep=self.sleep, **options)


# -- one cycle ---------------------------------------------------------------------------


@dataclass
class CycleResult:
    endpoint_id: str
    access: Access = Access.OK
    checked_in: bool = False
    message: str = ""  # why the cycle stopped short: offline, waiting, access denied
    recovered: str | None = None  # what the recovery of an interrupted apply did
    centralization: CentralizeResult | None = None
    update: UpdateResult | None = None
    # Drift of the live tree from the applied layers, when measured this cycle (a failure
    # to measure is said, and fails nothing else).
    compliance: LiveCompliance | None = None
    compliance_error: str = ""
    error: str = ""  # a failure after the check-in; the rest is still reported
    error_code: int = ExitCode.OK

    @property
    def exit_code(self) -> int:
        if self.access is Access.UNREACHABLE:
            return ExitCode.UNREACHABLE
        if self.access is Access.PENDING:
            return ExitCode.PENDING_APPROVAL
        if self.access is not Access.OK:
            return ExitCode.ACCESS_DENIED
        if self.error:
            return self.error_code
        if self.centralization is not None and self.centralization.errors:
            return ExitCode.PARTIAL
        return ExitCode.OK

    def to_dict(self) -> dict:
        out: dict = {"checked_in": self.checked_in, "endpoint_id": self.endpoint_id,
                     "access": str(self.access), "centralized": self.centralization is not None}
        if self.access is Access.UNREACHABLE:
            out["offline"] = self.message
        elif self.message:
            out["message"] = self.message
        if self.recovered:
            out["recovered"] = self.recovered
        if self.centralization is not None:
            out["result"] = self.centralization.to_dict()
        if self.update is not None:
            out["update"] = self.update.to_dict()
        if self.compliance is not None:
            out["compliance"] = self.compliance.to_dict()
        if self.compliance_error:
            out["compliance_error"] = self.compliance_error
        if self.error:
            out["error"] = self.error
        return out


def centralization_due(now: float, *, last: float | None, interval: float,
                       owed: bool = False) -> bool:
    """A centralization is due when none was ever made, when one is owed (an offline
    `agent backup`, an interrupted one: `pending_work`), or once the interval has passed."""
    return owed or last is None or now - last >= interval


def run_cycle(ctx: AgentContext, *, force: bool = False,
              trigger: str = "scheduled") -> CycleResult:
    """One cycle of `strata agent run` (`force`: `agent backup`, centralize whatever the
    interval). Failures after the check-in are recorded in the result, not raised."""
    st = ctx.state
    result = CycleResult(endpoint_id=ctx.credential.endpoint_id)
    with st.exclusive():
        # An apply killed midway leaves its journal: finish or undo it before anything
        # reads the tree (a snapshot of a half-switched tree would be worse than none).
        result.recovered = recover(ctx.root)
        client = ctx.client()
        try:
            _cycle(ctx, client, result, force=force, trigger=trigger)
        finally:
            st.add_wire_bytes(client.bytes_sent, client.bytes_received)
            client.close()
    return result


def _cycle(ctx: AgentContext, client: ServerClient, result: CycleResult, *, force: bool,
           trigger: str) -> None:
    st, root = ctx.state, ctx.root
    try:
        info = checkin(client, root, st, clock=ctx.clock)
    except ServerUnreachable as exc:
        _offline(ctx, result, exc, force=force)
        return
    except AccessDenied as exc:
        _denied(st, result, exc)
        return
    result.checked_in = True
    apply_bandwidth(client, info.policy.bandwidth, ctx.upload_rate)
    report_software(client, st, root)  # with the inventory; only when the list changed
    try:
        _after_checkin(ctx, client, info, result, force=force, trigger=trigger)
    except ServerUnreachable as exc:  # lost midway: what is owed stays in pending_work
        st.update_status(server_reachable=False)
        result.access, result.message = Access.UNREACHABLE, str(exc)
    except AccessDenied as exc:
        _denied(st, result, exc)
    except StrataError as exc:
        result.error, result.error_code = str(exc), exc.exit_code


def _after_checkin(ctx: AgentContext, client: ServerClient, info: CheckinResponse,
                   result: CycleResult, *, force: bool, trigger: str) -> None:
    st, root = ctx.state, ctx.root
    tree = local_tree(root, st, info)

    def central(trig: str) -> str:
        return centralize(client, st, root, info, trigger=trig, clock=ctx.clock).snapshot

    if st.update().get("state") == UpdateState.APPLYING:
        # Interrupted (killed, power cut): the journal's recovery above left the tree
        # whole, old or new; carry on with the update it belonged to.
        result.update = apply_update(client, st, tree, central)
    status = st.status()
    due = force or not info.last_snapshot or centralization_due(
        ctx.clock(), last=_last_time(status), interval=info.policy.interval_seconds,
        owed=CENTRALIZE in status.get("pending_work", []))
    if not due and _enforced(info, st):
        # Enforcement repairs against a fresh snapshot (which also keeps the user's
        # versions): take one now if anything changed since the last.
        due = tree_changed(root, info.policy.exclusions + own_exclusions(root, st),
                           st.parent()[1], one_file_system=ctx.credential.stays_on_root_fs)
    if due:
        _owe(st)
        result.centralization = ctx.with_progress("centralize", lambda p: centralize(
            client, st, root, info, trigger=trigger, progress=p, clock=ctx.clock))
    if info.desired is not None:
        desired = info.desired
        result.update = ctx.with_progress("layer download", lambda p: on_checkin(
            client, st, tree, desired, central, progress=p)) or result.update
    if result.update is not None and result.update.state == UpdateState.READY:
        prompt_restart(st.path, result.update.key, ready_detail(st.update()), ctx.clock())
    with contextlib.suppress(StrataError, OSError):  # a hint for restores: the next cycle
        learn_and_report(st.path, root, lambda: st.parent()[1], send_with(client),
                         clock=SessionClock(now=ctx.clock))
    _measure_compliance(ctx, client, info, tree, result)


def _measure_compliance(ctx: AgentContext, client: ServerClient, info: CheckinResponse,
                        tree: LocalTree, result: CycleResult) -> None:
    """Live compliance, when the applied layers are the desired ones (an update in
    flight is measured once applied) and a measurement is due."""
    desired, st = info.desired, ctx.state
    if desired is None or desired.key != st.applied_key():
        return
    changed = result.centralization is not None or result.update is not None
    if not live_compliance.due(st, desired.key, ctx.clock(), changed=changed):
        return
    try:
        result.compliance = live_compliance.measure_and_report(client, st, tree, desired,
                                                               now=ctx.clock())
    except (ServerUnreachable, AccessDenied):
        raise
    except StrataError as exc:
        result.compliance_error = f"compliance not measured: {exc}"


def _offline(ctx: AgentContext, result: CycleResult, exc: ServerUnreachable, *,
             force: bool) -> None:
    """Decide from what is known locally whether a centralization is owed, so that it is
    done as soon as the server is back and `agent status` shows it pending meanwhile."""
    st = ctx.state
    status = st.status()
    interval = (status.get("policy") or {}).get("interval_seconds", DEFAULT_INTERVAL)
    if force or centralization_due(ctx.clock(), last=_last_time(status), interval=interval):
        _owe(st)
    st.update_status(server_reachable=False)
    result.access, result.message = Access.UNREACHABLE, str(exc)


def _denied(st: AgentState, result: CycleResult, exc: AccessDenied) -> None:
    st.update_status(server_reachable=True, access=str(exc.access))
    result.access, result.message = exc.access, str(exc)


def _owe(st: AgentState) -> None:
    work = st.status().get("pending_work", [])
    if CENTRALIZE not in work:
        st.update_status(pending_work=[*work, CENTRALIZE])


def _last_time(status: dict) -> float | None:
    when = (status.get("last_centralization") or {}).get("time")
    try:
        return datetime.fromisoformat(when).timestamp() if when else None
    except (TypeError, ValueError):
        return None  # a damaged status file: centralize rather than guess


def _enforced(info: CheckinResponse, st: AgentState) -> bool:
    """An applied layer assignment under enforcement: drift is repaired at check-in."""
    desired = info.desired
    return desired is not None and desired.enforce and desired.key == st.applied_key()


def apply_bandwidth(client: ServerClient, policy: BandwidthLimits | None,
                    local_upload: float | None) -> None:
    """The server's caps for this endpoint's site and subnet, by its local time, and the
    local cap: the lower upload cap wins. Without a check-in (offline), the last one's."""
    client.follow(policy, local_upload)


def last_bandwidth(st: AgentState) -> BandwidthLimits | None:
    """The bandwidth rules of the last check-in (`agent apply` offline, `agent restore`)."""
    try:
        return BandwidthLimits.model_validate(
            (st.status().get("policy") or {}).get("bandwidth") or {})
    except ValueError:
        return None  # a damaged status file: no cap rather than no transfer


# -- apply (the restart) -----------------------------------------------------------------


@dataclass
class ApplyOutcome:
    recovered: str | None = None  # what the recovery of an interrupted apply did
    update: UpdateResult | None = None  # None: there was nothing to apply
    note: str = ""  # with nothing to apply: where the update stands, if there is one

    exit_code = ExitCode.OK  # nothing to apply is not a failure (boot scripts run this)

    def to_dict(self) -> dict:
        if self.update is not None:
            return {**self.update.to_dict(), "recovered": self.recovered}
        return {"state": "nothing-to-apply", "recovered": self.recovered, "note": self.note}


def apply_now(ctx: AgentContext) -> ApplyOutcome:
    """`strata agent apply`, what a restart runs: finish an interrupted apply, then apply
    the update that is ready (pre-update snapshot, switch, report, post-update snapshot).
    Without a server it applies from the cache, once the pre-update snapshot exists."""
    st, root = ctx.state, ctx.root
    with st.exclusive():
        outcome = ApplyOutcome(recovered=recover(root))
        saved = st.update()
        if not appliable(saved):
            outcome.note = _not_appliable(saved)
            return outcome
        client = ctx.client()
        try:
            try:
                info: CheckinResponse | None = checkin(client, root, st, clock=ctx.clock)
            except ServerUnreachable:
                info = None
            apply_bandwidth(client, info.policy.bandwidth if info else last_bandwidth(st),
                            ctx.upload_rate)
            tree = local_tree(root, st, info)

            def work(progress: Progress) -> UpdateResult:
                central: Centralizer | None = None
                if info is not None:
                    def central(trig: str) -> str:
                        assert info is not None
                        progress.restart(f"{trig} snapshot")
                        return centralize(client, st, root, info, trigger=trig,
                                          progress=progress, clock=ctx.clock).snapshot
                return apply_update(client if info else None, st, tree, central,
                                    progress=progress)
            # One bar through the steps: pre-update snapshot, download of what is still
            # missing, the files written, post-update snapshot.
            outcome.update = ctx.with_progress("apply", work)
        finally:
            st.add_wire_bytes(client.bytes_sent, client.bytes_received)
            client.close()
    return outcome


def _not_appliable(saved: dict) -> str:
    state = saved.get("state")
    if state == UpdateState.DOWNLOADING:
        return "an update is still downloading; `strata agent run` finishes it"
    if state == UpdateState.APPLIED:
        return "the last update is applied"
    return "no layer update is assigned to this endpoint" if not saved else ""


# -- compliance of the live tree -----------------------------------------------------------


def compliance_now(ctx: AgentContext) -> LiveCompliance | None:
    """`strata agent compliance`: measure the live tree against the applied layers now
    and report it (offline: measured from what the agent holds, reported next cycle).
    None when no IT layers are applied on this endpoint."""
    st, root = ctx.state, ctx.root
    with st.exclusive():
        client = ctx.client()
        try:
            try:
                info: CheckinResponse | None = checkin(client, root, st, clock=ctx.clock)
            except ServerUnreachable:
                info = None
            desired = live_compliance.applied_state(st, info.desired if info else None)
            if desired is None:
                if st.applied_key():
                    raise StrataError("the layers applied on this endpoint are not known "
                                      "here yet: the next check-in tells them (`strata "
                                      "agent run --once`)")
                return None
            live = live_compliance.measure(st, local_tree(root, st, info), desired,
                                           client if info else None, now=ctx.clock())
            if info is not None:
                live_compliance.report(client, live)
            st.update_status(compliance=live.summary())
            return live
        finally:
            st.add_wire_bytes(client.bytes_sent, client.bytes_received)
            client.close()

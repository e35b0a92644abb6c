"""The agent's cycle and daemon as a library, against a real server: an injected clock
decides when a centralization is due, an injected sleep runs many daemon cycles at once
(waiting for approval, a busy state directory), and the backoff is a pure function."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from server_fixtures import Server, running_server
from strata.agent.access import Access, ExitCode
from strata.agent.centralize import CentralizeResult
from strata.agent.cycle import AgentContext, CycleResult, centralization_due, run_cycle
from strata.agent.daemon import APPROVAL_MAX_WAIT, OFFLINE_MAX_WAIT, next_wait, run_daemon
from strata.agent.enrollment import enroll
from strata.agent.state import AgentState
from strata.engine.progress import Progress
from strata.errors import StrataError

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    yield from running_server(tmp_path_factory.mktemp("cycle") / "server-data")


class FakeClock:
    def __init__(self, start: float = 1_900_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


def enrolled(server: Server, base: Path, *, approval: bool = False,
             clock: FakeClock | None = None) -> AgentContext:
    root = base / "root"
    (root / "home/user").mkdir(parents=True)
    (root / "home/user/notes.txt").write_text("a first note\n")
    state = AgentState(base / "state")
    enroll(state, server=server.url, token=server.create_token(require_approval=approval),
           root=root)
    return AgentContext.load(state, clock=clock or FakeClock())


# -- pure decisions --------------------------------------------------------------------------


@pytest.mark.parametrize(("now", "last", "owed", "due"), [
    (1000.0, None, False, True),  # never centralized
    (1000.0, 900.0, False, False),  # within the interval
    (1000.0, 900.0, True, True),  # within it, but owed (an offline `agent backup`)
    (1000.0, 700.0, False, True),  # the interval (300 s) has passed
    (1000.0, 700.1, False, False),  # just short of it
])
def test_centralization_due(now, last, owed, due):
    assert centralization_due(now, last=last, interval=300, owed=owed) is due


def result(access: Access = Access.OK, error: str = "") -> CycleResult:
    return CycleResult(endpoint_id="e", access=access, checked_in=access is Access.OK,
                       error=error, error_code=2 if error else 0)


def test_next_wait_backs_off_while_the_server_cannot_be_used_and_resets_after():
    poll, wait, waits = 60.0, 60.0, []
    for _ in range(6):
        wait = next_wait(result(Access.UNREACHABLE), wait, poll)
        waits.append(wait)
    assert waits == [120, 240, 480, OFFLINE_MAX_WAIT, OFFLINE_MAX_WAIT, OFFLINE_MAX_WAIT]
    assert next_wait(result(), wait, poll) == poll
    assert next_wait(result(Access.PENDING), 240, poll) == APPROVAL_MAX_WAIT
    assert next_wait(result(error="disk full"), poll, poll) == 2 * poll
    assert next_wait(None, poll, poll) == 2 * poll  # the cycle raised
    assert next_wait(result(Access.UNREACHABLE), 5000, 5000) == 5000  # never below poll


def test_exit_codes_follow_the_cycle_outcome():
    assert result().exit_code == ExitCode.OK == 0
    assert result(Access.UNREACHABLE).exit_code == 3
    assert result(Access.PENDING).exit_code == 4
    assert result(Access.REVOKED).exit_code == result(Access.UNKNOWN).exit_code == 5
    assert result(error="no space").exit_code == 2
    partial = result()
    partial.centralization = CentralizeResult(snapshot="s", kind="incremental",
                                              errors=["home/x: permission denied"])
    assert partial.exit_code == ExitCode.PARTIAL == 1  # committed, but a file is missing


# -- the clock -------------------------------------------------------------------------------


def test_interval_decisions_follow_the_injected_clock(server, tmp_path):
    clock = FakeClock()
    ctx = enrolled(server, tmp_path, clock=clock)
    first = run_cycle(ctx)
    assert first.centralization is not None and first.centralization.kind == "centralize"
    interval = ctx.state.status()["policy"]["interval_seconds"]
    last = ctx.state.status()["last_centralization"]["time"]
    assert last.startswith("2030-03-17"), last  # the injected time, not the machine's

    clock.now += interval - 1
    assert run_cycle(ctx).centralization is None  # checked in, nothing due
    clock.now += 1
    again = run_cycle(ctx)
    assert again.centralization is not None and again.centralization.kind == "incremental"
    assert again.exit_code == 0


# -- the daemon, with sleep injected ---------------------------------------------------------


def test_daemon_waits_for_approval_then_centralizes(server, tmp_path):
    ctx = enrolled(server, tmp_path, approval=True)
    seen: list[CycleResult] = []
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:  # the administrator approves during the second wait
            server.admin("POST", f"/endpoints/{ctx.credential.endpoint_id}/approve")

    last = run_daemon(ctx, poll=60, on_cycle=seen.append, on_error=pytest.fail, sleep=sleep,
                      max_cycles=4)
    assert [r.access for r in seen] == [Access.PENDING, Access.PENDING, Access.OK, Access.OK]
    assert "approval" in seen[0].message
    assert waits == [120, 240, 60]  # backing off while pending, the poll interval after
    assert seen[2].centralization is not None  # the approval is picked up at once
    assert last is seen[3] and last.centralization is None and last.exit_code == 0


def test_daemon_stops_once_access_is_revoked(server, tmp_path):
    ctx = enrolled(server, tmp_path)
    server.admin("POST", f"/endpoints/{ctx.credential.endpoint_id}/revoke")
    waits: list[float] = []
    last = run_daemon(ctx, poll=60, on_cycle=lambda r: None, on_error=pytest.fail,
                      sleep=waits.append, max_cycles=10)
    assert last is not None and last.access is Access.REVOKED and waits == []
    assert last.exit_code == ExitCode.ACCESS_DENIED
    assert "revoked" in last.message and "enroll" in last.message


def test_daemon_rides_out_a_busy_state_directory(server, tmp_path):
    """`agent backup` holding the state directory when a cycle starts: the daemon says so
    and tries again after a wait; it does not die."""
    ctx = enrolled(server, tmp_path)
    held = contextlib.ExitStack()
    held.enter_context(AgentState(ctx.state.path).exclusive())
    errors: list[StrataError] = []
    seen: list[CycleResult] = []
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        held.close()  # the other run finishes

    run_daemon(ctx, poll=60, on_cycle=seen.append, on_error=errors.append, sleep=sleep,
               max_cycles=2)
    assert len(errors) == 1 and "another agent run" in str(errors[0])
    assert waits == [120]
    assert len(seen) == 1 and seen[0].centralization is not None


def test_daemon_retries_a_failed_backup_soon_not_after_the_interval(server, tmp_path,
                                                                     monkeypatch):
    """A centralization that fails after the check-in (the server refused it midway)
    stays owed: the next cycle, after a short backoff, does it, within the interval."""
    from strata.agent import cycle

    ctx = enrolled(server, tmp_path)
    assert run_cycle(ctx).centralization is not None  # the first one
    (ctx.root / "home/user/notes.txt").write_text("changed, then backed up by the user\n")
    real = cycle.centralize
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise StrataError("server refused (507): the store is full")
        return real(*args, **kwargs)
    monkeypatch.setattr(cycle, "centralize", failing_once)
    failed = run_cycle(ctx, force=True, trigger="user")  # `agent backup`
    assert failed.error and failed.centralization is None
    assert ctx.state.status()["pending_work"] == ["centralize"]

    seen: list[CycleResult] = []
    waits: list[float] = []
    run_daemon(ctx, poll=60, on_cycle=seen.append, on_error=pytest.fail,
               sleep=waits.append, max_cycles=2)  # the clock stands still: no interval
    assert seen[0].centralization is not None and seen[0].centralization.files_changed == 1
    assert seen[1].centralization is None  # paid
    assert ctx.state.status()["pending_work"] == [] and waits == [60]
    # And the daemon's wait after the failure itself is short, growing on repeats.
    assert next_wait(failed, 60, 60) == 120 and next_wait(failed, 120, 60) == 240


def test_a_layer_download_shows_its_progress(server, tmp_path):
    """The bytes of a layer download reach the context's progress (a bar with an ETA on a
    terminal), as a centralization's do."""
    ctx = enrolled(server, tmp_path)
    assert run_cycle(ctx).centralization is not None
    ref = tmp_path / "reference"
    (ref / "usr/lib/app").mkdir(parents=True)
    for i in range(3):
        (ref / f"usr/lib/app/part{i}.bin").write_bytes(bytes([i]) * 300_000 + b"%d" % i)
    server.admin_cli("layer", "capture", "--kind", "base", "--name", "shown", "--version", "1",
                     "--from-dir", ref)
    server.admin_cli("assign", "--endpoint", ctx.credential.endpoint_id, "--base", "shown:1")
    seen: dict[str, Progress] = {}

    def with_progress(label, work):
        seen[label] = Progress()
        return work(seen[label])
    ctx.with_progress = with_progress
    out = run_cycle(ctx)
    assert out.update is not None and out.update.state == "ready", out
    shown = seen["layer download"]
    assert shown.total_bytes and shown.bytes_done == shown.total_bytes >= 900_000

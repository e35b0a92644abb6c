"""Every wait longer than a couple of seconds has a progress bar with an ETA, that is a
known total: a layer download (the bytes the plan needs), `agent apply` (one bar through
the pre-update snapshot, the files written, the post-update snapshot: each step with its
own total, and each ends at its total), a centralization (the last snapshot's totals), an
`agent restore` (what it writes). Without a terminal, or with --json, nothing is drawn.

The agent runs in this process with a recording `with_progress` in place of the bar."""

from __future__ import annotations

import dataclasses
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server_fixtures import Agent, Server, centralized, strata
from strata.agent.cycle import AgentContext, apply_now, run_cycle
from strata.agent.state import AgentState
from strata.engine.progress import Progress

pytestmark = pytest.mark.e2e


@dataclasses.dataclass
class Step:
    label: str
    phase: str
    files: int
    nbytes: int
    total_files: int | None
    total_bytes: int | None


class Recorder:
    """A `with_progress` that records how each step of each bar ended."""

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def __call__(self, label: str, work: Callable[[Progress], Any]) -> Any:
        p = Progress(watched=True)
        restart = p.restart

        def note() -> None:
            self.steps.append(Step(label, p.phase, p.files_done, p.bytes_done,
                                   p.total_files, p.total_bytes))

        def restarted(phase: str, total_files: int | None = None,
                      total_bytes: int | None = None) -> None:
            if p.phase:
                note()
            restart(phase, total_files, total_bytes)
        p.restart = restarted  # type: ignore[method-assign]
        try:
            return work(p)
        finally:
            note()

    def step(self, label: str, phase: str = "") -> Step:
        return next(s for s in self.steps if s.label == label and s.phase == phase)


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("progress")
    rng = random.Random(3)
    v1 = base / "v1"
    write(v1 / "etc/os-release", b'ID=debian\nVERSION_ID="12"\n')
    for i in range(20):
        write(v1 / f"usr/lib/corp/mod{i}.so", rng.randbytes(30_000))
    v2 = base / "v2"
    shutil.copytree(v1, v2)
    write(v2 / "usr/lib/corp/new.so", rng.randbytes(1_500_000))
    write(v2 / "usr/lib/corp/mod3.so", rng.randbytes(40_000))
    root = base / "endpoint"
    shutil.copytree(v1, root)
    write(root / "home/ann/notes.txt", b"mine\n" * 1000)
    server = Server(base / "server").start()
    try:
        agent = Agent(server, root, base / "state")
        agent.enroll(server.create_token())
        centralized(agent.run_once())
        for version, tree in (("1", v1), ("2", v2)):
            server.admin_cli("layer", "capture", "--kind", "base", "--name", "os",
                             "--version", version, "--from-dir", tree)
        server.admin_cli("assign", "--all", "--base", "os:1")
        assert agent.run_once()["update"]["state"] == "applied"
        yield server, agent, root
    finally:
        server.stop()
        server.kill()


def context(agent: Agent, recorder: Recorder) -> AgentContext:
    return AgentContext.load(AgentState(agent.state), with_progress=recorder)


def test_a_centralization_knows_its_total_from_the_last_snapshot(world):
    _, agent, root = world
    write(root / "home/ann/more.txt", b"x" * 100_000)
    rec = Recorder()
    out = run_cycle(context(agent, rec), force=True)
    assert out.centralization is not None, out
    step = rec.step("centralize")
    # The last snapshot's files (the new one is not in it): close to what was walked.
    assert step.total_files == out.centralization.files - 1
    assert step.total_bytes is not None and step.nbytes >= step.total_bytes


def test_a_layer_download_and_the_apply_end_at_their_totals(world):
    server, agent, _ = world
    server.admin_cli("assign", "--all", "--base", "os:2")
    rec = Recorder()
    out = run_cycle(context(agent, rec))
    assert out.update is not None and out.update.state == "ready", out
    dl = rec.step("layer download")
    assert dl.total_bytes and dl.total_bytes >= 1_500_000  # the new file, at least
    assert dl.nbytes == dl.total_bytes

    rec = Recorder()
    done = apply_now(context(agent, rec))
    assert done.update is not None and done.update.state == "applied", done
    phases = [s.phase for s in rec.steps if s.label == "apply"]
    assert phases == ["pre-update snapshot", "apply", "post-update snapshot"], rec.steps
    pre = rec.step("apply", "pre-update snapshot")
    assert pre.total_files and pre.files >= pre.total_files  # from the last snapshot
    written = rec.step("apply", "apply")
    assert written.total_files == written.files == sum(done.update.changes.values())
    assert written.total_bytes == written.nbytes >= 1_540_000  # new.so and mod3.so


def test_without_a_terminal_or_with_json_nothing_is_drawn(world):
    _, agent, root = world
    proc = strata(*agent.cmd("restore", "usr/lib/corp/new.so", "--to", root.parent / "out"))
    assert proc.stderr == ""
    proc = strata(*agent.cmd("backup", "--json"))
    assert proc.stderr == ""

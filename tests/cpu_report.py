"""Where the suite's CPU goes: `pytest -p cpu_report` adds, per test module, the CPU seconds
of the test process and of every child it waited for (servers, agents, CLIs) and prints
the heaviest modules at the end. Wall time says little on a shared 2-core machine; CPU
seconds are what `make test` pays for on any machine.

Under xdist the workers' summaries are not shown: set STRATA_CPU_REPORT=FILE and each
process appends its lines there (`sort -rn FILE | head` after the run);
STRATA_CPU_REPORT_TESTS=FILE does the same per test (CPU and wall seconds).
"""

from __future__ import annotations

import os
import resource
import time
from collections import defaultdict
from collections.abc import Iterator

import pytest

import cli_forkserver

_spent: dict[str, float] = defaultdict(float)
_calls: dict[str, int] = defaultdict(int)
_per_test: list[tuple[float, float, float, float, str, float]] = []  # CPU s (own,
# children, forked), wall s, node id, when it started (Unix time)


def _parts() -> tuple[float, float, float]:
    """CPU seconds so far: this process's, its children's, and the forked commands'."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    # `strata` commands forked by tests/cli_forkserver.py are the fork server's children
    return (own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime,
            cli_forkserver.forked_cpu_s)


def _cpu() -> float:
    return sum(_parts())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    start, began, at = _parts(), time.monotonic(), time.time()
    yield
    module = item.nodeid.split("::", 1)[0]
    parts = [b - a for a, b in zip(start, _parts(), strict=True)]
    _spent[module] += sum(parts)
    _per_test.append((*parts, time.monotonic() - began, item.nodeid, at))
    _calls[module] += 1


def pytest_sessionfinish(session: pytest.Session) -> None:
    out = os.environ.get("STRATA_CPU_REPORT")
    if out and _spent:
        with open(out, "a") as f:
            f.writelines(f"{cpu:.1f} {_calls[m]} {m}\n" for m, cpu in _spent.items())
    # STRATA_CPU_REPORT_TESTS=FILE: one line per test, "CPU-seconds wall-seconds node-id
    # own children forked started worker" (CPU seconds of the test process, of its
    # children, of the commands it had forked; when it started; which xdist worker)
    per_test = os.environ.get("STRATA_CPU_REPORT_TESTS")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    if per_test and _per_test:
        with open(per_test, "a") as f:
            f.writelines(f"{own + kids + forked:.2f} {wall:.2f} {node} {own:.2f} {kids:.2f} "
                         f"{forked:.2f} {at:.1f} {worker}\n"
                         for own, kids, forked, wall, node, at in _per_test)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _spent:
        return
    terminalreporter.section("CPU seconds per module (test process and its children)")
    total = sum(_spent.values())
    for module, cpu in sorted(_spent.items(), key=lambda kv: -kv[1])[:40]:
        terminalreporter.write_line(f"{cpu:8.1f}  {_calls[module]:4d} tests  {module}")
    terminalreporter.write_line(f"{total:8.1f}  total")

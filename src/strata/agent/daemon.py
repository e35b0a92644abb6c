"""`strata agent run`: cycles, forever, at the poll interval; with a growing wait while
the server is unreachable or the endpoint waits for approval (a fleet coming back must
not stampede it); stopping only when the server refuses the endpoint for good (revoked,
unknown credential), since no retry can change that. Sleep is injected, so a test runs
many cycles at once."""

from __future__ import annotations

import time
from collections.abc import Callable

from strata.agent.access import Access
from strata.agent.cycle import AgentContext, CycleResult, run_cycle
from strata.errors import StrataError

OFFLINE_MAX_WAIT = 900.0  # a laptop back on the network centralizes within 15 minutes
APPROVAL_MAX_WAIT = 300.0  # an approved endpoint starts within 5 minutes
STOPS = (Access.REVOKED, Access.UNKNOWN)


def next_wait(result: CycleResult | None, previous: float, poll: float) -> float:
    """Seconds before the next cycle: `poll` after a good one; after a cycle that could
    not check in or failed (`result` None: it raised), twice the previous wait, capped."""
    if result is not None and result.access is Access.OK and not result.error:
        return poll
    cap = APPROVAL_MAX_WAIT if result is not None and result.access is Access.PENDING \
        else OFFLINE_MAX_WAIT
    return min(max(previous, poll) * 2, max(cap, poll))


def run_daemon(ctx: AgentContext, *, poll: float,
               on_cycle: Callable[[CycleResult], None],
               on_error: Callable[[StrataError], None],
               sleep: Callable[[float], None] = time.sleep,
               max_cycles: int | None = None) -> CycleResult | None:
    """Cycle until the endpoint's access is denied for good (that result is returned) or
    `max_cycles` have run. A cycle that raises (another agent run holds the state
    directory, a damaged journal) is reported and retried after a wait."""
    wait = poll
    last: CycleResult | None = None
    cycles = 0
    while True:
        try:
            last = run_cycle(ctx)
        except StrataError as exc:
            last = None
            on_error(exc)
        else:
            on_cycle(last)
            if last.access in STOPS:
                return last
        cycles += 1
        if max_cycles is not None and cycles >= max_cycles:
            return last
        wait = next_wait(last, wait, poll)
        sleep(wait)

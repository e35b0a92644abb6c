"""Which tier runs. `make test-fast` sets STRATA_FAST_TIER=1: the unit tests, a quick check
while working. `make test`, which CI runs, is the whole suite at full strength.

In the fast tier the property tests (hypothesis) try a quarter of their examples: the same
properties on fewer generated cases; the whole suite tries them all."""

from __future__ import annotations

import os

FAST = os.environ.get("STRATA_FAST_TIER") == "1"


def examples(full: int) -> int:
    """`full` examples in the whole suite; a quarter of them, at least 25, in the fast tier."""
    return max(full // 4, 25) if FAST else full

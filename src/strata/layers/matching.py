"""The one matcher of rules against an endpoint's facts: the server chooses driver layers
and collection members with it, and the agent checks with it that a driver layer no
assignment names is one whose signed rule fits the hardware the agent itself sees."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping


def hardware_facts(inventory: Mapping[str, object]) -> dict[str, str]:
    """The vendor and model an inventory reports (DMI, or the agent's hardware.json)."""
    hw = inventory.get("hardware", {})
    if not isinstance(hw, Mapping):
        hw = {}
    return {"vendor": str(hw.get("vendor", "")), "model": str(hw.get("model", ""))}


def rule_matches(rule: Mapping[str, str], facts: Mapping[str, str],
                 tags: Iterable[str] = ()) -> bool:
    """Every key's glob matches: facts case-insensitively (a vendor is "Dell Inc." or
    "DELL"), tags exactly (an administrator's own labels)."""
    for key, pattern in rule.items():
        if key == "tag":
            if not any(fnmatch.fnmatchcase(t, pattern) for t in tags):
                return False
        elif not fnmatch.fnmatchcase(facts.get(key, "").lower(), str(pattern).lower()):
            return False
    return True

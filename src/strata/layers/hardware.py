"""Which driver layers fit a machine: a driver layer's match rule (vendor and model
globs, case-insensitive) against the machine's DMI facts. One rule for the server, which
chooses drivers by it, and the agent, which accepts a driver no assignment names only
when its signed rule fits the hardware the agent itself sees."""

from __future__ import annotations

import fnmatch


def hardware_facts(inventory: dict) -> dict[str, str]:
    hw = inventory.get("hardware", {}) if isinstance(inventory, dict) else {}
    if not isinstance(hw, dict):
        hw = {}
    return {"vendor": str(hw.get("vendor", "")), "model": str(hw.get("model", ""))}


def rule_matches(rule: dict, facts: dict[str, str]) -> bool:
    """An empty rule matches nothing: a driver layer is for the hardware it names."""
    return bool(rule) and all(fnmatch.fnmatchcase(facts.get(key, "").lower(),
                                                  str(pattern).lower())
                              for key, pattern in rule.items())

"""What the server knows of an endpoint's platform (OS family, hardware, hostname, tags)
and the one matcher of rules against it: driver layers choose hardware with it,
collections choose endpoints with it."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

from strata.layers.rules import os_family
from strata.server.catalog.models import Endpoint

RULE_KEYS = ("os", "vendor", "model", "hostname", "tag")


def endpoint_family(ep: Endpoint) -> str:
    """linux or windows: which layer rules and exclusions apply to the endpoint."""
    return os_family(ep.os or str((ep.inventory or {}).get("os", "")))


def endpoint_facts(ep: Endpoint) -> dict[str, str]:
    """The facts a rule may test, from the endpoint's record and its last inventory."""
    hw = (ep.inventory or {}).get("hardware", {})
    if not isinstance(hw, dict):
        hw = {}
    return {"os": ep.os or "", "vendor": str(hw.get("vendor", "")),
            "model": str(hw.get("model", "")), "hostname": ep.hostname or ""}


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


def endpoint_matches(ep: Endpoint, rule: Mapping[str, str]) -> bool:
    return rule_matches(rule, endpoint_facts(ep), ep.tags or [])

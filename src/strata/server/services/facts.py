"""What the server knows of an endpoint's platform (OS family, hardware, hostname, tags),
for the one matcher of rules (strata.layers.matching, which the agent shares): driver
layers choose hardware with it, collections choose endpoints with it."""

from __future__ import annotations

from collections.abc import Mapping

from strata.layers.matching import rule_matches
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


def endpoint_matches(ep: Endpoint, rule: Mapping[str, str]) -> bool:
    return rule_matches(rule, endpoint_facts(ep), ep.tags or [])

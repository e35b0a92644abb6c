"""Policy documents the administrator edits: upload (what is never centralized, how
often), retention, bandwidth rules by subnet/site and time window, and layer rules; their
defaults, their validation, and how a bandwidth rule applies. Defaults apply until an
administrator stores a document of the same kind (services/policies.py)."""

from __future__ import annotations

import ipaddress
from datetime import datetime, time

from sqlalchemy.orm import Session

from strata.engine.retention import RetentionPolicy
from strata.layers.rules import DEFAULT_RULES, validate_rules
from strata.model.bandwidth import in_window
from strata.model.wire import BandwidthLimits, BandwidthWindow
from strata.server.catalog.models import Policy

# Never centralized: caches, temp, swap and paging files, trash, the agent's own state.
LINUX_EXCLUSIONS = [
    "/proc/", "/sys/", "/dev/", "/run/", "/tmp/", "/var/tmp/", "/var/cache/",
    "/var/lib/strata-agent/", "/lost+found/", "/swapfile", "/swap.img",
    "/mnt/", "/media/",  # removable media and ad-hoc mounts: not the endpoint's own
    "/home/*/.cache/", "/root/.cache/", "/home/*/.local/share/Trash/",
]
WINDOWS_EXCLUSIONS = [
    "/pagefile.sys", "/hiberfil.sys", "/swapfile.sys", "/$Recycle.Bin/",
    "/System Volume Information/", "/Windows/Temp/", "/Windows/SoftwareDistribution/Download/",
    "/ProgramData/Strata/", "/Users/*/AppData/Local/Temp/",
    "/Users/*/AppData/Local/Microsoft/Windows/INetCache/",
]

DEFAULTS: dict[str, dict] = {
    "upload": {"interval_seconds": 3600, "exclusions": {"linux": LINUX_EXCLUSIONS,
                                                         "windows": WINDOWS_EXCLUSIONS}},
    "retention": {"hourly": 24, "daily": 31, "monthly": 12},
    # rules: [{"subnet": "10.1.0.0/16" | None, "site": "paris" | None, "start": "08:00",
    #          "end": "18:00", "upload_kbps": 512, "download_kbps": 2048}], first match wins
    "bandwidth": {"rules": []},
    # Layer rules per OS family: which paths are identity, user data, never in a layer,
    # do-not-override, do-not-download, system areas (strata.layers.rules).
    "layers": DEFAULT_RULES,
    # rules: [{"subnet": "10.20.0.0/16" | "site": "lyon", "reflectors": ["ID", ...]}]: the
    # first rule matching an endpoint names the reflectors it downloads from (in order)
    "reflectors": {"rules": []},
}


def get_policy(db: Session, kind: str) -> dict:
    if kind not in DEFAULTS:
        raise KeyError(kind)
    row = db.get(Policy, kind)
    return row.document if row else DEFAULTS[kind]


# A revert point (the snapshot an update takes before it applies) and the history a restore
# moved onto new hardware are kept this long whatever the retention counts say: cutting
# `hourly` must not take away the way back from last week's update, nor the old machine's
# history while the new one fills its counts. The retention document's `protect_days`
# changes it (`revert_points_days` is its older name).
PROTECT_DAYS = 30
REVERT_POINT_TRIGGERS = ("pre-update",)
_PROTECT_KEYS = ("protect_days", "revert_points_days")
_TOP_KEYS = {"upload": {"interval_seconds", "exclusions"}, "bandwidth": {"rules"},
             "reflectors": {"rules"}}
MAX_REFLECTOR_RULES = 1000
MAX_REFLECTORS_PER_RULE = 8


def merge_policy(current: dict, partial: dict) -> dict:
    """`partial` laid over `current`: a key it names replaces the current value, except
    that objects merge key by key (so `{"exclusions": {"windows": [...]}}` keeps the Linux
    list); lists and scalars are replaced whole."""
    out = dict(current)
    for key, value in partial.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_policy(out[key], value)
        else:
            out[key] = value
    return out


Change = tuple[str, object, object]  # (dotted key, before, after); None: absent


def policy_changes(before: object, after: object, key: str = "") -> list[Change]:
    """What differs between two documents, as (dotted key, before, after): an item added
    to or removed from a list of plain values is one change each (before or after None),
    anything else is compared whole."""
    if before == after:
        return []
    if isinstance(before, dict) and isinstance(after, dict):
        out: list[Change] = []
        for k in sorted(set(before) | set(after), key=str):
            sub = f"{key}.{k}" if key else str(k)
            if k not in before:
                out.append((sub, None, after[k]))
            elif k not in after:
                out.append((sub, before[k], None))
            else:
                out += policy_changes(before[k], after[k], sub)
        return out
    plain = (str, int, float, bool)
    if isinstance(before, list) and isinstance(after, list) and all(
            isinstance(v, plain) for v in [*before, *after]):
        removed: list[Change] = [(key, v, None) for v in before if v not in after]
        return removed + [(key, None, v) for v in after if v not in before]
    return [(key, before, after)]


def _count(kind: str, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{kind} {key} must be a whole number, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{kind} {key} must be a whole number, got {value!r}") from None


def validate_policy(kind: str, doc: dict) -> dict:
    """Check a document an administrator wants to store; raise ValueError if malformed."""
    if not isinstance(doc, dict):
        raise ValueError("a policy document is a JSON object")
    unknown = set(doc) - _TOP_KEYS.get(kind, set(doc))
    if unknown:
        raise ValueError(f"unknown {kind} keys: {', '.join(sorted(unknown))} (known: "
                         f"{', '.join(sorted(_TOP_KEYS[kind]))})")
    if kind == "upload":
        interval = _count("upload", "interval_seconds", doc.get("interval_seconds", 3600))
        if interval < 60:
            raise ValueError("interval_seconds must be at least 60")
        excl = doc.get("exclusions", {})
        if not isinstance(excl, dict) or not all(
                isinstance(v, list) and all(isinstance(p, str) for p in v)
                for v in excl.values()):
            raise ValueError("exclusions must map an OS name to a list of patterns")
        return {"interval_seconds": interval, "exclusions": excl}
    if kind == "retention":
        policy = retention_policy(doc)
        if policy.is_empty():
            raise ValueError("a retention policy must keep something")
        return {k: _count("retention", k, v) for k, v in doc.items()}
    if kind == "bandwidth":
        rules = doc.get("rules", [])
        if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
            raise ValueError('rules must be a list of objects, e.g. [{"subnet": '
                             '"10.1.0.0/16", "upload_kbps": 512}]')
        allowed = {"subnet", "site", "start", "end", "upload_kbps", "download_kbps"}
        for i, r in enumerate(rules, 1):
            unknown = set(r) - allowed
            if unknown:
                raise ValueError(f"rule {i}: unknown keys {', '.join(sorted(unknown))} "
                                 f"(known: {', '.join(sorted(allowed))})")
            for key in ("subnet", "site", "start", "end"):
                if r.get(key) is not None and not isinstance(r[key], str):
                    raise ValueError(f"rule {i}: {key} must be a string")
            if r.get("subnet"):
                ipaddress.ip_network(r["subnet"], strict=False)
            for key in ("start", "end"):
                if r.get(key):
                    try:
                        time.fromisoformat(r[key])
                    except ValueError:
                        raise ValueError(f"rule {i}: {key} must be a time such as 08:00, "
                                         f"got {r[key]!r}") from None
            for key in ("upload_kbps", "download_kbps"):
                if r.get(key) is not None and _count("bandwidth", key, r[key]) <= 0:
                    raise ValueError(f"{key} must be positive")
        return {"rules": rules}
    if kind == "layers":
        return validate_rules(doc)
    if kind == "reflectors":
        return {"rules": _reflector_rules(doc.get("rules", []))}
    raise ValueError(f"unknown policy kind {kind!r}")


def _reflector_rules(rules: object) -> list[dict]:
    """Each rule matches by subnet or site (or both) and names 1-8 reflector ids."""
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise ValueError('rules must be a list of objects, e.g. [{"subnet": "10.20.0.0/16", '
                         '"reflectors": ["ID"]}]')
    if len(rules) > MAX_REFLECTOR_RULES:
        raise ValueError(f"at most {MAX_REFLECTOR_RULES} rules")
    allowed = {"subnet", "site", "reflectors"}
    out = []
    for i, r in enumerate(rules, 1):
        unknown = set(r) - allowed
        if unknown:
            raise ValueError(f"rule {i}: unknown keys {', '.join(sorted(unknown))} (known: "
                             f"{', '.join(sorted(allowed))})")
        if not r.get("subnet") and not r.get("site"):
            raise ValueError(f"rule {i}: give a subnet or a site to match")
        for key in ("subnet", "site"):
            if r.get(key) is not None and not isinstance(r[key], str):
                raise ValueError(f"rule {i}: {key} must be a string")
        if r.get("subnet"):
            try:
                ipaddress.ip_network(r["subnet"], strict=False)
            except ValueError:
                raise ValueError(f"rule {i}: {r['subnet']!r} is not a subnet such as "
                                 "10.20.0.0/16") from None
        ids = r.get("reflectors")
        if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_REFLECTORS_PER_RULE or \
                not all(isinstance(x, str) and 0 < len(x) <= 64 for x in ids):
            raise ValueError(f"rule {i}: reflectors must be a list of 1 to "
                             f"{MAX_REFLECTORS_PER_RULE} reflector ids")
        out.append({k: r[k] for k in ("subnet", "site", "reflectors") if r.get(k)})
    return out


def reflectors_for(rules: list[dict], addresses: list[str], site: str) -> list[str]:
    """The reflector ids of the first rule matching an endpoint at `addresses` (the one
    it reports, then the one the server sees) and `site`, as the bandwidth rules match."""
    for rule in rules:
        if rule.get("subnet") and not any(_in_subnet(a, rule["subnet"]) for a in addresses):
            continue
        if rule.get("site") and rule["site"] != site:
            continue
        return list(rule.get("reflectors", []))
    return []


def retention_policy(doc: dict) -> RetentionPolicy:
    allowed = {"last", "hourly", "daily", "weekly", "monthly", "yearly", *_PROTECT_KEYS}
    unknown = set(doc) - allowed
    if unknown:
        raise ValueError(f"unknown retention keys: {', '.join(sorted(unknown))} (known: "
                         f"{', '.join(sorted(allowed))})")
    counts = {k: _count("retention", k, v) for k, v in doc.items()}
    return RetentionPolicy(last=counts.get("last", 0), hourly=counts.get("hourly", 0),
                           daily=counts.get("daily", 0), weekly=counts.get("weekly", 0),
                           monthly=counts.get("monthly", 0), yearly=counts.get("yearly", 0),
                           protect_days=protect_days(doc))


def protect_days(doc: dict) -> int:
    """How long revert points and moved history are protected (days; 0: not at all)."""
    given = [k for k in _PROTECT_KEYS if k in doc]
    if len(given) > 1:
        raise ValueError("give protect_days only (revert_points_days is its older name)")
    key = given[0] if given else "protect_days"
    days = _count("retention", key, doc.get(key, PROTECT_DAYS))
    if days < 0:
        raise ValueError(f"{key} must be 0 or more, got {days}")
    return days


def bandwidth_for(rules: list[dict], addresses: list[str], site: str,
                  local: datetime) -> BandwidthLimits:
    """The rules that apply to an endpoint at `addresses` (the one it reports, then the
    one the server sees) and `site`, in order, and the caps in force at its local time
    `local` (the first rule whose window holds it). The agent gets both: it follows the
    windows by its own clock until its next check-in."""
    windows = []
    for rule in rules:
        if rule.get("subnet") and not any(_in_subnet(a, rule["subnet"]) for a in addresses):
            continue
        if rule.get("site") and rule["site"] != site:
            continue
        windows.append(BandwidthWindow(
            start=_time_of_day(rule.get("start")) if rule.get("end") else None,
            end=_time_of_day(rule.get("end")) if rule.get("start") else None,
            upload_kbps=rule.get("upload_kbps"), download_kbps=rule.get("download_kbps")))
    now = next((w for w in windows if in_window(w.start, w.end, local.time())), None)
    return BandwidthLimits(upload_kbps=now.upload_kbps if now else None,
                           download_kbps=now.download_kbps if now else None,
                           windows=windows)


def _in_subnet(address: str, subnet: str) -> bool:
    try:
        return ipaddress.ip_interface(address).ip in ipaddress.ip_network(subnet, strict=False)
    except ValueError:
        return False


def _time_of_day(text: str | None) -> str | None:
    return time.fromisoformat(text).isoformat() if text else None

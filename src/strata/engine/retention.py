"""Retention: decide which snapshots a keep-policy retains, with restic ``forget`` semantics.

A pure function over snapshot metadata; it never touches a store, so a dry run and the real
forget see exactly the same decisions. Besides the counts, a policy may protect some
snapshots for a time whatever the counts say (a revert point taken before an update, the
history a restore moved onto new hardware): `protect_days` from each one's `protected_since`,
judged against the `now` the caller passes (no clock is read here).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

UNLIMITED = -1
"""Count meaning "no limit" for a keep rule, as restic's ``--keep-daily -1``."""

_COUNT_FIELDS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True)
class RetentionPolicy:
    """How many snapshots to keep per kind of bucket; 0 disables a rule, -1 is unlimited."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    tags: tuple[str, ...] = ()  # keep any snapshot having one of these tags
    # Keep a snapshot that carries `protected_since` for this many days after it, uncounted
    # (as tags are); 0 protects nothing.
    protect_days: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.protect_days, int) or isinstance(self.protect_days, bool) or \
                self.protect_days < 0:
            raise ValueError(f"protect_days must be a whole number of days >= 0, "
                             f"got {self.protect_days!r}")
        for name in _COUNT_FIELDS:
            value = getattr(self, name)
            # bool is an int, but keep_daily=True is almost certainly a mistake
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < UNLIMITED:
                raise ValueError(f"{name} must be >= -1 (-1 means unlimited), got {value}")
        if isinstance(self.tags, str):
            # a bare string would otherwise be read as one tag per character
            raise TypeError("tags must be a sequence of strings, not a string")
        # duplicates would only duplicate "has tags" reasons
        object.__setattr__(self, "tags", tuple(dict.fromkeys(self.tags)))

    def is_empty(self) -> bool:
        return not self.tags and all(getattr(self, n) == 0 for n in _COUNT_FIELDS)

    @classmethod
    def default_server(cls) -> RetentionPolicy:
        """About a year of history: the last day hourly, a month daily, a year monthly."""
        return cls(hourly=24, daily=31, monthly=12)


@dataclass(frozen=True)
class SnapshotInfo:
    """The part of a snapshot that retention looks at."""

    id: str
    time: datetime
    host: str = ""
    paths: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    # The start of its protection (a revert point: when it was taken; moved history: when
    # it moved), and what it is, for the reason; None: counts alone decide.
    protected_since: datetime | None = None
    protected_as: str = "protected snapshot"

    def __post_init__(self) -> None:
        # naive times cannot be ordered against aware ones nor bucketed in a chosen zone
        for when in (self.time, self.protected_since):
            if when is not None and (when.tzinfo is None or when.utcoffset() is None):
                raise ValueError(f"snapshot {self.id}: time must be timezone-aware")
        object.__setattr__(self, "paths", tuple(self.paths))
        object.__setattr__(self, "tags", tuple(self.tags))


@dataclass(frozen=True)
class Decision:
    snapshot: SnapshotInfo
    keep: bool
    reasons: tuple[str, ...]  # restic's wording, e.g. ("last snapshot", "daily snapshot")


def _by_position(_t: datetime, nr: int) -> Hashable:
    return nr  # every snapshot is its own bucket, so keep-last counts snapshots


def _hour(t: datetime, _nr: int) -> Hashable:
    return (t.year, t.month, t.day, t.hour)


def _day(t: datetime, _nr: int) -> Hashable:
    return (t.year, t.month, t.day)


def _iso_week(t: datetime, _nr: int) -> Hashable:
    # ISO year, not calendar year: 2020-12-31 and 2021-01-01 are both in 2020-W53
    iso = t.isocalendar()
    return (iso.year, iso.week)


def _month(t: datetime, _nr: int) -> Hashable:
    return (t.year, t.month)


def _year(t: datetime, _nr: int) -> Hashable:
    return t.year


# Order matters: it is the order reasons are listed in, same as restic.
_BUCKETS: tuple[tuple[str, str, Callable[[datetime, int], Hashable]], ...] = (
    ("last", "last snapshot", _by_position),
    ("hourly", "hourly snapshot", _hour),
    ("daily", "daily snapshot", _day),
    ("weekly", "weekly snapshot", _iso_week),
    ("monthly", "monthly snapshot", _month),
    ("yearly", "yearly snapshot", _year),
)

_UNSET = object()


def _group_key(snap: SnapshotInfo) -> tuple[str, tuple[str, ...]]:
    # restic sorts paths in the group key, so `backup /b /a` groups with `backup /a /b`
    return (snap.host, tuple(sorted(snap.paths)))


def _protection(snap: SnapshotInfo, policy: RetentionPolicy,
                now: datetime | None) -> str | None:
    """Why `snap` is protected at `now`, or None."""
    if snap.protected_since is None or policy.protect_days == 0:
        return None
    if now is None:  # a forgotten clock must not silently drop the protection
        raise ValueError("protect_days needs the time now to judge protection against")
    until = snap.protected_since + timedelta(days=policy.protect_days)
    if now >= until:
        return None
    return f"{snap.protected_as} (protected until {until.astimezone(now.tzinfo):%Y-%m-%d})"


def _apply_to_group(
    group: list[SnapshotInfo], policy: RetentionPolicy, tz: tzinfo | None,
    now: datetime | None = None,
) -> list[Decision]:
    # reverse=True keeps the sort stable, so equal times stay in input order as in restic
    ordered = sorted(group, key=lambda s: s.time, reverse=True)
    remaining = {kind: getattr(policy, kind) for kind, _, _ in _BUCKETS}
    last_value: dict[str, object] = {kind: _UNSET for kind, _, _ in _BUCKETS}
    oldest = len(ordered) - 1
    decisions = []
    for nr, snap in enumerate(ordered):
        local = snap.time.astimezone(tz)  # tz=None converts to the system's local time
        # tags are not counted against anything, like restic's --keep-tag
        reasons = [f"has tags [{tag}]" for tag in policy.tags if tag in snap.tags]
        protected = _protection(snap, policy, now)  # not counted either
        if protected:
            reasons.append(protected)
        for kind, reason, bucket in _BUCKETS:
            if remaining[kind] == 0:
                continue
            value = bucket(local, nr)
            if value != last_value[kind]:
                reasons.append(reason)
            elif nr == oldest:
                # restic >= 0.16 also keeps the oldest snapshot while a rule has counts left,
                # so a young repository does not lose its only old history
                reasons.append(f"oldest {reason}")
            else:
                continue
            last_value[kind] = value
            if remaining[kind] > 0:
                remaining[kind] -= 1
        decisions.append(Decision(snapshot=snap, keep=bool(reasons), reasons=tuple(reasons)))
    return decisions


def apply_policy(
    snapshots: Iterable[SnapshotInfo], policy: RetentionPolicy, tz: tzinfo | None = None,
    *, now: datetime | None = None,
) -> list[Decision]:
    """Decide keep/forget for every snapshot, per (host, paths) group as restic's default.

    Returns one decision per snapshot: groups in (host, sorted paths) order, newest first within
    a group. `tz` is the zone hour/day/week/month/year buckets are computed in (default: the
    system's local time). `now` is the time protection (`protect_days`) is judged at. An
    empty policy raises ValueError rather than silently keeping (or forgetting) everything.
    """
    if policy.is_empty():
        raise ValueError("empty policy")
    groups: dict[tuple[str, tuple[str, ...]], list[SnapshotInfo]] = {}
    for snap in snapshots:
        groups.setdefault(_group_key(snap), []).append(snap)
    decisions: list[Decision] = []
    for key in sorted(groups):
        decisions.extend(_apply_to_group(groups[key], policy, tz, now))
    return decisions

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.engine.retention import (
    Decision,
    RetentionPolicy,
    SnapshotInfo,
    apply_policy,
)
from tier import examples


def snap(when: str, host: str = "h", paths: tuple[str, ...] = ("/data",), tags=()) -> SnapshotInfo:
    """A snapshot whose id is its own timestamp, so expectations read as times."""
    time = datetime.fromisoformat(when).replace(tzinfo=UTC)
    return SnapshotInfo(id=when, time=time, host=host, paths=paths, tags=tuple(tags))


def snaps(*whens: str) -> list[SnapshotInfo]:
    return [snap(w) for w in whens]


def kept(decisions: list[Decision]) -> list[str]:
    return [d.snapshot.id for d in decisions if d.keep]


def reasons(decisions: list[Decision]) -> dict[str, tuple[str, ...]]:
    return {d.snapshot.id: d.reasons for d in decisions if d.keep}


CASES = [
    pytest.param(
        RetentionPolicy(last=3),
        snaps("2021-01-01", "2021-01-02", "2021-01-03", "2021-01-04", "2021-01-05"),
        ["2021-01-05", "2021-01-04", "2021-01-03"],
        id="keep-last-3-keeps-three-newest",
    ),
    pytest.param(
        RetentionPolicy(last=10),
        snaps("2021-01-01", "2021-01-02"),
        ["2021-01-02", "2021-01-01"],
        id="keep-last-more-than-available-keeps-all",
    ),
    pytest.param(
        RetentionPolicy(hourly=2),
        snaps(
            "2021-01-01T10:05",
            "2021-01-01T10:40",
            "2021-01-01T11:10",
            "2021-01-01T11:50",
            "2021-01-01T12:30",
        ),
        ["2021-01-01T12:30", "2021-01-01T11:50"],
        id="hourly-keeps-newest-per-hour",
    ),
    pytest.param(
        RetentionPolicy(daily=3),
        snaps(
            "2021-01-01T12:00",
            "2021-01-02T08:00",
            "2021-01-02T20:00",
            "2021-01-03T09:00",
            "2021-01-03T23:59",
            "2021-01-04T00:00",
        ),
        ["2021-01-04T00:00", "2021-01-03T23:59", "2021-01-02T20:00"],
        id="daily-keeps-newest-per-day",
    ),
    pytest.param(
        RetentionPolicy(weekly=2),
        # Mon 2021-01-04 opens 2021-W01; Thu 2020-12-31 and Fri 2021-01-01 are both 2020-W53
        snaps("2020-12-27", "2020-12-28", "2020-12-31", "2021-01-01", "2021-01-04"),
        ["2021-01-04", "2021-01-01"],
        id="weekly-iso-week-spans-new-year",
    ),
    pytest.param(
        RetentionPolicy(yearly=2),
        # same snapshots as above: calendar years do split at new year
        snaps("2020-12-27", "2020-12-28", "2020-12-31", "2021-01-01", "2021-01-04"),
        ["2021-01-04", "2020-12-31"],
        id="yearly-calendar-year-splits-new-year",
    ),
    pytest.param(
        RetentionPolicy(monthly=2),
        snaps("2021-01-31", "2021-02-01", "2021-02-28", "2021-03-01", "2021-03-15"),
        ["2021-03-15", "2021-02-28"],
        id="monthly-keeps-newest-per-month",
    ),
    pytest.param(
        RetentionPolicy(yearly=2),
        snaps("2020-06-01", "2021-01-01", "2021-12-31", "2022-01-01", "2022-06-01"),
        ["2022-06-01", "2021-12-31"],
        id="yearly-keeps-newest-per-year",
    ),
    pytest.param(
        RetentionPolicy(daily=-1),
        snaps(
            "2021-01-01T09:00",
            "2021-01-02T09:00",
            "2021-01-02T18:00",
            "2021-01-03T09:00",
            "2021-01-03T18:00",
        ),
        ["2021-01-03T18:00", "2021-01-02T18:00", "2021-01-01T09:00"],
        id="daily-unlimited-keeps-one-per-day-forever",
    ),
    pytest.param(
        RetentionPolicy(last=-1),
        snaps("2021-01-01", "2021-01-02", "2021-01-03"),
        ["2021-01-03", "2021-01-02", "2021-01-01"],
        id="last-unlimited-keeps-everything",
    ),
    pytest.param(
        RetentionPolicy(hourly=5),
        # restic >= 0.16: a rule with counts left also keeps the group's oldest snapshot,
        # even though 10:40 already represents that hour
        snaps("2021-01-01T10:05", "2021-01-01T10:40", "2021-01-01T11:10", "2021-01-01T11:50"),
        ["2021-01-01T11:50", "2021-01-01T10:40", "2021-01-01T10:05"],
        id="oldest-kept-while-counts-remain",
    ),
]


@pytest.mark.parametrize(("policy", "snapshots", "expected"), CASES)
def test_kept_snapshots(policy, snapshots, expected):
    assert kept(apply_policy(snapshots, policy, tz=UTC)) == expected


def test_oldest_reason_is_prefixed():
    decisions = apply_policy(
        snaps("2021-01-01T10:05", "2021-01-01T10:40"), RetentionPolicy(hourly=5), tz=UTC
    )
    assert reasons(decisions) == {
        "2021-01-01T10:40": ("hourly snapshot",),
        "2021-01-01T10:05": ("oldest hourly snapshot",),
    }


def test_reasons_accumulate_across_rules():
    decisions = apply_policy(
        snaps(
            "2021-01-10T09:00",
            "2021-02-15T09:00",
            "2021-03-01T09:00",
            "2021-03-02T08:00",
            "2021-03-02T10:00",
        ),
        RetentionPolicy(last=1, daily=2, monthly=2),
        tz=UTC,
    )
    assert reasons(decisions) == {
        "2021-03-02T10:00": ("last snapshot", "daily snapshot", "monthly snapshot"),
        "2021-03-01T09:00": ("daily snapshot",),
        "2021-02-15T09:00": ("monthly snapshot",),
    }
    removed = [d for d in decisions if not d.keep]
    assert [d.snapshot.id for d in removed] == ["2021-03-02T08:00", "2021-01-10T09:00"]
    assert all(d.reasons == () for d in removed)


def test_decisions_cover_every_snapshot_newest_first():
    shuffled = snaps("2021-01-02", "2021-01-04", "2021-01-01", "2021-01-03")
    decisions = apply_policy(shuffled, RetentionPolicy(last=1), tz=UTC)
    assert [d.snapshot.id for d in decisions] == [
        "2021-01-04",
        "2021-01-03",
        "2021-01-02",
        "2021-01-01",
    ]


def test_keep_tag_keeps_tagged_snapshots_uncounted():
    snapshots = [
        snap("2021-01-01", tags=("release",)),
        snap("2021-01-02"),
        snap("2021-01-03", tags=("release", "manual")),
        snap("2021-01-04"),
    ]
    decisions = apply_policy(snapshots, RetentionPolicy(last=1, tags=("release",)), tz=UTC)
    assert reasons(decisions) == {
        "2021-01-04": ("last snapshot",),
        "2021-01-03": ("has tags [release]",),
        "2021-01-01": ("has tags [release]",),
    }


def test_tags_alone_are_a_policy():
    snapshots = [snap("2021-01-01", tags=("keep",)), snap("2021-01-02")]
    assert kept(apply_policy(snapshots, RetentionPolicy(tags=("keep",)), tz=UTC)) == ["2021-01-01"]


def test_policy_applies_per_host_and_paths_group():
    snapshots = [
        snap("2021-01-01", host="alpha"),
        snap("2021-01-02", host="alpha"),
        snap("2021-01-03", host="beta"),
        snap("2021-01-04", host="beta"),
        snap("2021-01-05", host="beta", paths=("/other",)),
        # the same two paths listed in another order are one group, so only 01-07 survives
        snap("2021-01-06", host="beta", paths=("/data", "/etc")),
        snap("2021-01-07", host="beta", paths=("/etc", "/data")),
    ]
    decisions = apply_policy(snapshots, RetentionPolicy(last=1), tz=UTC)
    assert kept(decisions) == ["2021-01-02", "2021-01-04", "2021-01-07", "2021-01-05"]
    groups = [(d.snapshot.host, tuple(sorted(d.snapshot.paths))) for d in decisions]
    assert groups == sorted(groups), "decisions come grouped, groups in a stable order"


def test_timezone_moves_snapshots_between_days():
    snapshots = snaps("2021-01-01T21:30", "2021-01-01T22:30", "2021-01-02T10:00")
    # in UTC 22:30 is still January 1st; at UTC+2 it is 00:30 on January 2nd, so 21:30
    # (23:30 local) becomes the newest of January 1st instead
    assert kept(apply_policy(snapshots, RetentionPolicy(daily=2), tz=UTC)) == [
        "2021-01-02T10:00",
        "2021-01-01T22:30",
    ]
    plus_two = timezone(timedelta(hours=2))
    assert kept(apply_policy(snapshots, RetentionPolicy(daily=2), tz=plus_two)) == [
        "2021-01-02T10:00",
        "2021-01-01T21:30",
    ]


def test_empty_policy_raises():
    with pytest.raises(ValueError, match="empty policy"):
        apply_policy(snaps("2021-01-01"), RetentionPolicy(), tz=UTC)
    assert RetentionPolicy().is_empty()
    assert not RetentionPolicy(tags=("x",)).is_empty()
    assert not RetentionPolicy(yearly=-1).is_empty()


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"daily": -2}, id="below-unlimited"),
        pytest.param({"last": True}, id="bool-count"),
        pytest.param({"tags": "release"}, id="bare-string-tags"),
    ],
)
def test_invalid_policy_rejected(kwargs):
    with pytest.raises((ValueError, TypeError)):
        RetentionPolicy(**kwargs)


def test_naive_snapshot_time_rejected():
    with pytest.raises(ValueError, match="timezone-aware"):
        SnapshotInfo(id="x", time=datetime(2021, 1, 1))


def test_default_server_policy():
    policy = RetentionPolicy.default_server()
    assert (policy.hourly, policy.daily, policy.monthly) == (24, 31, 12)
    assert (policy.last, policy.weekly, policy.yearly, policy.tags) == (0, 0, 0, ())


def test_no_snapshots_no_decisions():
    assert apply_policy([], RetentionPolicy(last=1), tz=UTC) == []


# --- properties -----------------------------------------------------------------------------

EPOCH = datetime(2019, 6, 1, tzinfo=UTC)
# minutes spread over ~3 years, so every bucket kind sees both collisions and boundaries
minutes = st.integers(min_value=0, max_value=3 * 366 * 24 * 60)
hosts = st.sampled_from(["alpha", "beta", "gamma"])
snapshot_sets = st.lists(st.tuples(minutes, hosts), max_size=60, unique_by=lambda t: t[0]).map(
    lambda items: [
        SnapshotInfo(id=f"s{i}", time=EPOCH + timedelta(minutes=m), host=h)
        for i, (m, h) in enumerate(items)
    ]
)
counts = st.integers(min_value=0, max_value=6)
finite_policies = st.builds(
    RetentionPolicy,
    last=counts,
    hourly=counts,
    daily=counts,
    weekly=counts,
    monthly=counts,
    yearly=counts,
).filter(lambda p: not p.is_empty())


def newest_per_host(snapshots: list[SnapshotInfo], n: int) -> set[str]:
    ids: set[str] = set()
    for host in {s.host for s in snapshots}:
        mine = sorted((s for s in snapshots if s.host == host), key=lambda s: s.time)
        ids.update(s.id for s in mine[::-1][:n])
    return ids


@settings(max_examples=examples(300), deadline=None)
@given(snapshot_sets, finite_policies)
def test_kept_never_exceeds_sum_of_counts_per_group(snapshots, policy):
    decisions = apply_policy(snapshots, policy, tz=UTC)
    assert sorted(d.snapshot.id for d in decisions) == sorted(s.id for s in snapshots)
    budget = policy.last + policy.hourly + policy.daily + policy.weekly
    budget += policy.monthly + policy.yearly
    for host in {s.host for s in snapshots}:
        assert sum(d.keep for d in decisions if d.snapshot.host == host) <= budget


@settings(max_examples=examples(300), deadline=None)
@given(snapshot_sets, st.integers(min_value=1, max_value=8))
def test_keep_last_keeps_exactly_the_n_newest_per_group(snapshots, n):
    decisions = apply_policy(snapshots, RetentionPolicy(last=n), tz=UTC)
    assert set(kept(decisions)) == newest_per_host(snapshots, n)


@settings(max_examples=examples(300), deadline=None)
@given(snapshot_sets, finite_policies)
def test_keep_last_newest_are_kept_whatever_else_is_set(snapshots, policy):
    decisions = apply_policy(snapshots, policy, tz=UTC)
    assert newest_per_host(snapshots, policy.last) <= set(kept(decisions))


# --- protection: revert points and moved history, kept for protect_days ---------------------

NOW = datetime(2021, 3, 1, tzinfo=UTC)


def protected(when: str, since: str, label: str = "pre-update revert point") -> SnapshotInfo:
    return SnapshotInfo(id=when, time=datetime.fromisoformat(when).replace(tzinfo=UTC),
                        host="h", paths=("/data",), protected_as=label,
                        protected_since=datetime.fromisoformat(since).replace(tzinfo=UTC))


PROTECTION_CASES = [
    pytest.param(
        RetentionPolicy(last=1, protect_days=30),
        [protected("2021-02-20", "2021-02-20"), snap("2021-02-28")],
        ["2021-02-28", "2021-02-20"],
        id="a-revert-point-younger-than-protect-days-is-kept-beyond-the-counts",
    ),
    pytest.param(
        RetentionPolicy(last=1, protect_days=30),
        [protected("2021-01-20", "2021-01-20"), snap("2021-02-28")],
        ["2021-02-28"],
        id="an-older-revert-point-is-counted-like-any-snapshot",
    ),
    pytest.param(
        RetentionPolicy(last=1, protect_days=30),
        [protected("2019-05-01", "2021-02-27", "history moved by a restore"),
         snap("2021-02-28")],
        ["2021-02-28", "2019-05-01"],
        id="moved-history-is-protected-from-when-it-moved-not-from-when-it-was-taken",
    ),
    pytest.param(
        RetentionPolicy(last=1, protect_days=0),
        [protected("2021-02-28T10:00", "2021-02-28T10:00"), snap("2021-02-28T11:00")],
        ["2021-02-28T11:00"],
        id="protect-days-0-protects-nothing",
    ),
    pytest.param(
        RetentionPolicy(last=1, protect_days=1),
        [protected("2021-02-28", "2021-02-28"), snap("2021-02-28T12:00")],
        ["2021-02-28T12:00"],
        id="protection-ends-exactly-protect-days-after-it-starts",
    ),
]


@pytest.mark.parametrize(("policy", "snapshots", "expected"), PROTECTION_CASES)
def test_protected_snapshots(policy, snapshots, expected):
    assert kept(apply_policy(snapshots, policy, tz=UTC, now=NOW)) == expected


def test_protection_says_why_and_until_when():
    decisions = apply_policy([protected("2021-02-20", "2021-02-20"), snap("2021-02-28")],
                             RetentionPolicy(last=1, protect_days=30), tz=UTC, now=NOW)
    assert reasons(decisions)["2021-02-20"] == (
        "pre-update revert point (protected until 2021-03-22)",)


def test_protection_without_the_time_now_is_refused():
    with pytest.raises(ValueError, match="needs the time now"):
        apply_policy([protected("2021-02-20", "2021-02-20")],
                     RetentionPolicy(last=1, protect_days=30), tz=UTC)


@pytest.mark.parametrize("days", [-1, True, 1.5])
def test_invalid_protect_days_rejected(days):
    with pytest.raises(ValueError, match="protect_days"):
        RetentionPolicy(last=1, protect_days=days)


# Some snapshots of each set carry a protection start at any time up to NOW.
protected_sets = st.lists(st.tuples(minutes, hosts, st.none() | minutes), max_size=60,
                          unique_by=lambda t: t[0]).map(lambda items: [
    SnapshotInfo(id=f"s{i}", time=EPOCH + timedelta(minutes=m), host=h,
                 protected_since=None if p is None else EPOCH + timedelta(minutes=p))
    for i, (m, h, p) in enumerate(items)])
PROPERTY_NOW = EPOCH + timedelta(days=3 * 366)


@settings(max_examples=examples(300), deadline=None)
@given(protected_sets, finite_policies, st.integers(min_value=0, max_value=400))
def test_protection_only_adds_the_protected_to_what_the_counts_keep(snapshots, policy, days):
    """Protected snapshots are kept uncounted: every other decision is exactly the one the
    counts alone make, and nothing still protected at `now` is forgotten."""
    from dataclasses import replace

    counted = set(kept(apply_policy(snapshots, policy, tz=UTC)))
    with_protection = set(kept(apply_policy(snapshots, replace(policy, protect_days=days),
                                            tz=UTC, now=PROPERTY_NOW)))
    still = {s.id for s in snapshots if s.protected_since is not None and days and
             PROPERTY_NOW < s.protected_since + timedelta(days=days)}
    assert with_protection == counted | still

"""Bandwidth rules that hold (issue 14, item 5): the cap applies to the byte stream in
small pieces (over any 1-second window the rate stays within 10% of it), `kbps` means
kilobits per second, windows are read in the endpoint's local time, rules match the site
and subnet the agent reports, and every transfer follows them."""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime, timedelta, timezone
from datetime import time as tod

import httpx
import pytest

from server_fixtures import Agent, Server, centralized, running_server, strata_json
from strata.agent.client import ServerClient
from strata.agent.location import local_subnet, read_site, write_site
from strata.agent.throttle import TokenBucket, parse_rate
from strata.model.wire import BandwidthLimits, BandwidthWindow, CheckinRequest
from strata.server.policies import bandwidth_for

MIB = 1 << 20


class FakeTime:
    """A clock that moves only when something sleeps: the link itself is infinitely
    fast, so whatever spacing the bytes get comes from the cap alone."""

    def __init__(self) -> None:
        self.now = 100.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def worst_windows(arrivals: list[tuple[float, int]], span: float = 1.0) -> tuple[int, int]:
    """(most, least) bytes in any `span`-second window ending at an arrival, over the
    windows that lie wholly inside the transfer."""
    most, least = 0, 1 << 62
    first = arrivals[0][0]
    for i, (t, _) in enumerate(arrivals):
        total = sum(n for u, n in arrivals[:i + 1] if u > t - span)
        most = max(most, total)
        if t - span >= first:
            least = min(least, total)
    return most, least


def fake_client(ft: FakeTime, handler) -> ServerClient:
    client = ServerClient("http://strata.test", sleep=ft.sleep, clock=ft.clock)
    client.http = httpx.Client(base_url="http://strata.test",
                               transport=httpx.MockTransport(handler))
    client._downloads = lambda: client.http  # type: ignore[method-assign]  # no socket here
    return client


@pytest.mark.parametrize("kbps", [160, 2_000, 20_000])  # 20 KB/s, 250 KB/s, 2.5 MB/s
def test_download_rate_stays_within_10_percent_of_the_cap_over_every_second(kbps):
    ft = FakeTime()
    cap = kbps * 125
    body = random.Random(1).randbytes(int(cap * 6))  # six seconds' worth
    client = fake_client(ft, lambda req: httpx.Response(200, content=body))
    client.follow(BandwidthLimits(download_kbps=kbps))
    arrivals = []
    with client.stream("POST", "/x", json={}) as reader:
        while piece := reader.read(65536):
            arrivals.append((ft.now, len(piece)))
    assert sum(n for _, n in arrivals) == len(body)
    most, least = worst_windows(arrivals)
    assert most <= 1.1 * cap, (most, cap)
    assert least >= 0.9 * cap, (least, cap)  # smooth both ways: no stop-and-go
    assert 5.5 <= ft.now - 100.0 <= 6.5  # the whole took what the cap says


def test_upload_body_leaves_in_paced_pieces():
    ft = FakeTime()
    cap = 1_000 * 125  # 1000 kbps
    arrivals: list[tuple[float, int]] = []

    class Receiver(httpx.BaseTransport):  # reads the body as a socket would, piece by piece
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            for piece in request.stream:  # type: ignore[union-attr]
                arrivals.append((ft.now, len(piece)))
            return httpx.Response(200, json={})

    client = ServerClient("http://strata.test", sleep=ft.sleep, clock=ft.clock)
    client.http = httpx.Client(base_url="http://strata.test", transport=Receiver())
    client.follow(BandwidthLimits(upload_kbps=1_000))
    body = random.Random(2).randbytes(cap * 5)
    client.request("POST", "/upload", content=body)
    assert sum(n for _, n in arrivals) == len(body) and len(arrivals) > 100
    most, least = worst_windows(arrivals)
    assert 0.9 * cap <= least <= most <= 1.1 * cap, (least, most, cap)


def test_the_lower_upload_cap_wins_and_windows_follow_the_local_clock():
    ft = FakeTime()
    client = fake_client(ft, lambda req: httpx.Response(200, json={}))
    local = [tod(7, 59)]
    limits = BandwidthLimits(windows=[
        BandwidthWindow(start="08:00", end="18:00", upload_kbps=800, download_kbps=1600),
        BandwidthWindow(download_kbps=80_000)])
    client.follow(limits, local_upload=150_000.0, local_time=lambda: local[0])
    assert (client.upload.rate, client.download.rate) == (150_000.0, 10_000_000.0)
    local[0] = tod(8, 0)  # the working day starts in the middle of a transfer
    ft.now += 1.0
    client.request("GET", "/x")
    assert (client.upload.rate, client.download.rate) == (100_000.0, 200_000.0)


def test_a_window_that_starts_mid_upload_slows_it_there_and_the_body_stays_whole():
    ft = FakeTime()
    got: list[tuple[float, bytes]] = []

    class Receiver(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            for piece in request.stream:  # type: ignore[union-attr]
                got.append((ft.now, piece))
            return httpx.Response(200, json={})

    client = ServerClient("http://strata.test", sleep=ft.sleep, clock=ft.clock)
    client.http = httpx.Client(base_url="http://strata.test", transport=Receiver())
    # 07:59:57 when the upload starts: three seconds at 8000 kbps, then 800 kbps.
    client.follow(BandwidthLimits(windows=[
        BandwidthWindow(start="08:00", end="18:00", upload_kbps=800),
        BandwidthWindow(upload_kbps=8_000)]),
        local_time=lambda: tod(7, 59, 57 + min(int(ft.now - 100.0), 2)) if ft.now < 103.0
        else tod(8, 0, int(ft.now - 103.0) % 60))
    body = random.Random(4).randbytes(3 * 1_000_000 + 4 * 100_000)
    client.request("POST", "/upload", content=body)
    assert b"".join(p for _, p in got) == body  # the piece size changed midway: no gap
    before = sum(len(p) for t, p in got if t < 103.0)
    after = sum(len(p) for t, p in got if t >= 104.0)
    assert 0.9 * 3_000_000 <= before <= 1.1 * 3_000_000, before
    assert ft.now - 100.0 == pytest.approx(7.0, abs=0.3)  # 3 s fast, then 4 s at 100 kB/s
    assert after <= 1.1 * 300_000, after


def test_token_bucket_starts_empty_and_never_lends_more_than_a_sliver():
    ft = FakeTime()
    bucket = TokenBucket(100_000, clock=ft.clock, sleep=ft.sleep)
    assert bucket.consume(10_000) == pytest.approx(0.1)  # no free first second
    ft.now += 60  # idle for a minute: at most 2% of a second is saved up
    assert bucket.consume(10_000) == pytest.approx(0.08)
    assert 256 <= TokenBucket(1_000).piece <= TokenBucket(10 * MIB).piece == 16 << 10


@pytest.mark.parametrize(("text", "bytes_per_s"), [
    ("512K", 524_288), ("2M", 2 * MIB), ("100000", 100_000), ("1MB/s", MIB),
    ("512KiB/s", 524_288), ("20mbit", 2_500_000), ("512kbps", 64_000),
    ("2Mbit/s", 250_000), ("8bit", 1)])
def test_rates_are_read_in_the_units_they_name(text, bytes_per_s):
    assert parse_rate(text) == bytes_per_s


def test_kbps_in_the_policy_are_kilobits_per_second():
    assert BandwidthLimits(upload_kbps=512, download_kbps=8_000).caps_at(tod(12)) == \
        (64_000, 1_000_000)


RULES = [
    {"subnet": "10.20.0.0/16", "start": "08:00", "end": "18:00", "download_kbps": 2_000},
    {"site": "lyon", "start": "22:00", "end": "06:00", "download_kbps": 50_000},
    {"site": "lyon", "download_kbps": 4_000},
    {"upload_kbps": 1_000},
]


def test_rules_match_the_reported_subnet_and_site_in_the_endpoints_local_time():
    # 07:30 UTC is 09:30 in an endpoint two hours ahead: inside its working day.
    at_0730_utc = datetime(2026, 12, 2, 7, 30, tzinfo=UTC)
    local = at_0730_utc.astimezone(timezone(timedelta(hours=2)))
    # Behind NAT the server sees 203.0.113.9; the agent reports 10.20.3.4/16.
    nat = bandwidth_for(RULES, ["10.20.3.4/16", "203.0.113.9"], "", local)
    assert nat.download_kbps == 2_000
    assert nat.windows is not None and len(nat.windows) == 2  # the subnet rule, the default
    assert bandwidth_for(RULES, ["203.0.113.9"], "", local).download_kbps is None
    # In the server's UTC it would still be before 08:00: not the working-day cap.
    assert bandwidth_for(RULES, ["10.20.3.4"], "", at_0730_utc).download_kbps is None
    lyon = bandwidth_for(RULES, ["192.168.1.5"], "lyon", local)
    assert [w.download_kbps for w in lyon.windows or []] == [50_000, 4_000, None]
    assert lyon.download_kbps == 4_000
    # The agent follows the windows by its own clock until its next check-in.
    assert lyon.caps_at(tod(23, 15)) == (None, 50_000 * 125)
    assert lyon.caps_at(tod(5, 59)) == (None, 50_000 * 125)
    assert lyon.caps_at(tod(6, 0)) == (None, 4_000 * 125)


def test_what_an_agent_reports_about_where_it_is_is_checked(tmp_path):
    for bad in ({"site": "../etc"}, {"site": "x" * 65}, {"subnet": "10.0.0.0/33"},
                {"subnet": "not an address"}, {"utc_offset_minutes": 24 * 60}):
        with pytest.raises(ValueError):
            CheckinRequest(**bad)
    assert CheckinRequest(site="lyon", subnet="10.20.3.4/16", utc_offset_minutes=-300)
    assert local_subnet("http://127.0.0.1:1") == "127.0.0.1/8"
    write_site(tmp_path, "lyon")
    assert read_site(tmp_path) == "lyon"
    (tmp_path / "site").write_text("../../x\n")  # a damaged file is no site
    assert read_site(tmp_path) is None


# -- end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    yield from running_server(tmp_path_factory.mktemp("bandwidth") / "server-data")


@pytest.mark.e2e
def test_the_site_and_subnet_an_agent_reports_pick_its_rules_and_restore_follows_them(
        server: Server, tmp_path):
    root = tmp_path / "root"
    (root / "home/ann").mkdir(parents=True)
    size = 400_000
    (root / "home/ann/photo.raw").write_bytes(random.Random(3).randbytes(size))
    agent = Agent(server, root, tmp_path / "state")
    agent.enroll(server.create_token())
    strata_json("agent", "site", "lyon", "--state", agent.state)
    rules = tmp_path / "bandwidth.json"
    rules.write_text(json.dumps({"rules": [
        {"site": "paris", "download_kbps": 100},  # another site: not ours
        {"site": "lyon", "subnet": "127.0.0.0/8", "download_kbps": 1_600}]}))  # 200 KB/s
    server.admin_cli("policy", "set", "bandwidth", rules, "--replace")
    try:
        centralized(agent.run_once())
        policy = json.loads((agent.state / "status.json").read_text())["policy"]
        assert policy["bandwidth"]["download_kbps"] == 1_600, policy
        status = agent.status()
        assert status["site"] == "lyon"
        assert status["bandwidth_kbps"] == {"upload": None, "download": 1_600}, status
        (root / "home/ann/photo.raw").unlink()
        started = time.monotonic()
        agent.restore("home/ann/photo.raw")
        seconds = time.monotonic() - started
    finally:
        server.admin_cli("policy", "reset", "bandwidth", "--yes")
    assert (root / "home/ann/photo.raw").stat().st_size == size
    # 400 kB at 200 kB/s: two seconds at least (it ignored the policy before: a blink).
    assert seconds >= 0.9 * size / 200_000, seconds

"""Open-loop check-ins: a simulated fleet against one server process.

`python -m bench.openloop [--endpoints 10000] [--interval 60] [--seconds 60]
[--search-seconds 15] [--no-search] [--long]` starts a server on loopback, enrolls the
endpoints through the real API (many enrollments in flight), then has each check in with
its inventory at Poisson arrivals, once per interval on average. The arrivals follow their
schedule whatever the server does (open loop): a request's latency runs from its
scheduled time, so one that waited for the generator or for a connection counts its wait
(no coordinated omission). Then a search over the endpoint count for the largest fleet
whose p99 stays under the target. Writes bench/openloop-results.json, which `make bench`
puts into BENCHMARKS.md.

The generator is one asyncio process speaking HTTP/1.1 itself over a pool of keep-alive
connections (the requests are made once, so a check-in costs it a few tens of
microseconds); its CPU is measured and reported beside the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from . import report
from .checkins import inventory, start_server
from .tools import ROOT, busy_cpu_s

RESULTS = Path(__file__).parent / "openloop-results.json"  # read by bench.run's report
TARGET_P99_MS = 200.0
CONNECTIONS = 256  # the pool's cap: past it, a due check-in waits (and that wait counts)
TIMEOUT_S = 10.0  # a check-in not answered by then is an error
KEEP_ALIVE_S = 20.0  # under the server's 30 s: an idle connection older than this is closed
CHECKIN = "/api/v1/agent/checkin"
_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


class HttpError(Exception):
    pass


class Pool:
    """Keep-alive HTTP/1.1 connections to one loopback server, at most `size` at once.
    Requests go out as prepared bytes; answers are read by their Content-Length."""

    def __init__(self, host: str, port: int, size: int = CONNECTIONS):
        self.host, self.port = host, port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self._slots = asyncio.Semaphore(size)
        self.opened = 0

    @classmethod
    def for_url(cls, url: str, size: int = CONNECTIONS) -> Pool:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        return cls(host, int(port), size)

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        async with self._slots:
            conn, reused = self._take(), True
            if conn is None:
                conn, reused = await self._open(), False
            try:
                status, body, keep = await _exchange(conn, raw)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                conn[1].close()
                if not reused:
                    raise HttpError(str(exc) or type(exc).__name__) from exc
                # The server closed it as we sent: once more, on a new connection.
                conn = await self._open()
                try:
                    status, body, keep = await _exchange(conn, raw)
                except (asyncio.IncompleteReadError, ConnectionError) as exc2:
                    conn[1].close()
                    raise HttpError(str(exc2) or type(exc2).__name__) from exc2
            except BaseException:
                conn[1].close()
                raise
            if keep:
                self._idle.append((conn[0], conn[1], time.monotonic()))
            else:
                conn[1].close()
            return status, body

    def _take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The most recently used idle connection; those idle past the server's keep-alive
        (30 s) are closed rather than tried."""
        while self._idle:
            reader, writer, used = self._idle.pop()
            if time.monotonic() - used < KEEP_ALIVE_S:
                return reader, writer
            writer.close()
        return None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.opened += 1
        return await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        for _, writer, _ in self._idle:
            writer.close()
        self._idle.clear()


async def _exchange(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                    raw: bytes) -> tuple[int, bytes, bool]:
    reader, writer = conn
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    length = _LENGTH.search(head)
    if not head.startswith(b"HTTP/1.1 ") or length is None:
        raise HttpError(f"unexpected answer: {head[:80]!r}")
    body = await reader.readexactly(int(length.group(1)))
    return int(head[9:12]), body, b"connection: close" not in head.lower()


def post(path: str, body: object, token: str | None = None) -> bytes:
    """A prepared HTTP/1.1 POST with a JSON body."""
    data = json.dumps(body, separators=(",", ":")).encode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST {path} HTTP/1.1\r\nHost: bench\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def enroll(pool: Pool, admin: str, first: int, count: int,
                 in_flight: int = 32) -> list[str]:
    """`count` endpoints (sim-FIRST...) enrolled through the API, many at once."""
    status, body = await pool.send(post("/api/v1/admin/tokens",
                                         {"uses": count, "expires": "2h"}, admin))
    if status != 200:
        raise RuntimeError(f"token: {status} {body[:200]!r}")
    token = json.loads(body)["token"]
    sem = asyncio.Semaphore(in_flight)

    async def one(i: int) -> str:
        async with sem:
            status, body = await pool.send(post("/api/v1/agent/enroll", {
                "token": token, "hostname": f"sim-{i:05d}", "os": "debian",
                "inventory": inventory(i)}))
        if status != 200:
            raise RuntimeError(f"enroll: {status} {body[:200]!r}")
        return str(json.loads(body)["credential"])
    return list(await asyncio.gather(*(one(i) for i in range(first, first + count))))


@dataclass
class Phase:
    """What one open-loop run recorded."""

    latencies: list[float] = field(default_factory=list)  # scheduled -> answered, seconds
    worst: dict[int, float] = field(default_factory=dict)  # second of the run -> max latency
    lags: list[float] = field(default_factory=list)  # scheduled -> sent (the generator's)
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def note(self, second: int, latency: float) -> None:
        self.worst[second] = max(latency, self.worst.get(second, 0.0))


def changed_inventory(i: int, rng: random.Random, change: float) -> dict:
    """Endpoint i's inventory; with probability `change` its disk's free space has moved
    since the last check-in (as on a real endpoint: the agent sends statvfs figures)."""
    inv = inventory(i)
    if rng.random() < change:
        inv["disks"][0]["free_bytes"] -= rng.randrange(1, 1 << 30) & ~4095
    return inv


async def open_loop(pool: Pool, creds: list[str], interval: float, seconds: float,
                    change: float, seed: int = 1) -> tuple[Phase, float]:
    """Poisson arrivals at len(creds)/interval a second for `seconds`, each a check-in of
    an endpoint picked at random (so each checks in once per interval on average).
    Returns what was recorded and the seconds until the last answer."""
    rng = random.Random(seed)
    rate = len(creds) / interval
    phase = Phase()
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    async def checkin(i: int, due: float) -> None:
        raw = post(CHECKIN, {"inventory": changed_inventory(i, rng, change),
                             "status": {"applied_key": None}}, creds[i])
        phase.lags.append(loop.time() - due)
        try:
            status, body = await asyncio.wait_for(pool.send(raw), TIMEOUT_S)
        except TimeoutError:
            phase.error("timeout")
            phase.note(int(due - start), TIMEOUT_S)
            return
        except (HttpError, OSError) as exc:
            phase.error(f"{type(exc).__name__}: {str(exc)[:60]}")
            return
        phase.latencies.append(loop.time() - due)
        phase.note(int(due - start), phase.latencies[-1])
        if status != 200:
            phase.error(f"HTTP {status}")
        elif b'"credential":"' in body:  # rotated: the agent adopts it (agent/centralize.py)
            creds[i] = json.loads(body)["credential"]

    start = loop.time() + 0.05
    due = start
    while True:
        due += rng.expovariate(rate)
        if due > start + seconds:
            break
        wait = due - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        task = loop.create_task(checkin(rng.randrange(len(creds)), due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    return phase, loop.time() - start


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _cpu_of(pid: int | list[int]) -> float:
    """CPU seconds of a process, or of several (the server processes of bench/scaleout.py)."""
    total = 0.0
    for one in [pid] if isinstance(pid, int) else pid:
        fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def measure_phase(pool: Pool, creds: list[str], interval: float, seconds: float,
                        change: float, server_pid: int | list[int], seed: int = 1) -> dict:
    """One open-loop run with its figures: latency percentiles from the schedule, errors,
    achieved rate, and the CPU of the generator, the server and the rest of the machine."""
    cpu0, srv0, busy0, load0 = _cpu_self(), _cpu_of(server_pid), busy_cpu_s(), os.getloadavg()
    sampler = asyncio.get_running_loop().create_task(_sample_cpu(server_pid, samples := []))
    phase, wall = await open_loop(pool, creds, interval, seconds, change, seed)
    sampler.cancel()
    gen, srv = _cpu_self() - cpu0, _cpu_of(server_pid) - srv0
    busy = busy_cpu_s() - busy0
    lat, lags = sorted(phase.latencies), sorted(phase.lags)
    sent = len(phase.lags)
    ms = {f"p{int(q * 100)}_ms": round(_quantile(lat, q) * 1000, 1)
          for q in (0.5, 0.95, 0.99)}
    errors = sum(phase.errors.values())
    return {
        "endpoints": len(creds), "interval_s": interval, "seconds": seconds,
        "offered_per_s": round(len(creds) / interval, 1),
        "checkins": sent, "achieved_per_s": round((sent - errors) / wall, 1),
        **ms, "max_ms": round((lat[-1] if lat else float("nan")) * 1000, 1),
        "errors": errors, "error_kinds": phase.errors,
        "generator_lag_p99_ms": round(_quantile(lags, 0.99) * 1000, 1),
        "generator_cpu_s": round(gen, 2),
        "generator_cpu_share": round(gen / wall, 3),  # of one CPU
        "generator_us_per_checkin": round(gen / max(sent, 1) * 1e6),
        "server_cpu_s": round(srv, 2), "server_cpu_share": round(srv / wall, 3),
        "server_us_per_checkin": round(srv / max(sent, 1) * 1e6),
        "other_cpu_s": round(max(0.0, busy - gen - srv), 1),
        "load_average": [round(x, 1) for x in (*load0, *os.getloadavg())[::3]],  # 1 min
        "inventory_changes": change,
        **_when_slow(phase.worst, samples),
        "held": errors == 0 and lat != [] and _quantile(lat, 0.99) * 1000 < TARGET_P99_MS,
    }


async def _sample_cpu(server_pid: int | list[int], out: list[tuple[float, float]]) -> None:
    """Each second of a run: the CPU the server got and the CPU the machine was busy
    with (both in CPUs), to tell a slow server from a starved one."""
    srv, busy = _cpu_of(server_pid), busy_cpu_s()
    while True:
        await asyncio.sleep(1.0)
        srv2, busy2 = _cpu_of(server_pid), busy_cpu_s()
        out.append((srv2 - srv, busy2 - busy))
        srv, busy = srv2, busy2


def _when_slow(worst: dict[int, float], samples: list[tuple[float, float]]) -> dict:
    """The seconds in which some check-in took longer than the target, and the CPU the
    server and the whole machine had in those seconds against the others."""
    slow = {s for s, lat in worst.items() if lat * 1000 >= TARGET_P99_MS}

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 2) if values else None
    return {
        "seconds_over_target": len(slow), "seconds_run": len(worst),
        "server_cpus_when_slow": mean([samples[s][0] for s in slow if s < len(samples)]),
        "server_cpus_otherwise": mean([x[0] for s, x in enumerate(samples) if s not in slow]),
        "machine_busy_when_slow": mean([samples[s][1] for s in slow if s < len(samples)]),
        "machine_busy_otherwise": mean([x[1] for s, x in enumerate(samples)
                                        if s not in slow]),
    }


async def search(pool: Pool, creds: list[str], grow: Callable, interval: float,
                 seconds: float, change: float, server_pid: int | list[int], passed: int,
                 failed: int | None, steps: int, say: Callable[[str], None]) -> list[dict]:
    """The largest endpoint count whose p99 holds: up by 1.5x from the last that held
    until one fails, then halve the gap; `steps` short runs in all."""
    tried: list[dict] = []
    for k in range(steps):
        if failed is None:
            n = int(passed * 1.5)
        else:
            n = (passed + failed) // 2
            if failed - passed <= max(500, passed // 20):
                break
        n = round(n, -2)
        await grow(n)
        row = await measure_phase(pool, creds[:n], interval, seconds, change, server_pid,
                                  seed=100 + k)
        say(_line(row))
        tried.append(row)
        if row["held"]:
            passed = n
        else:
            failed = n
    return tried


def _line(r: dict) -> str:
    return (f"  {r['endpoints']:>6} endpoints, {r['offered_per_s']:.0f}/s offered, "
            f"{r['achieved_per_s']:.0f}/s done: p50 {r['p50_ms']} p95 {r['p95_ms']} "
            f"p99 {r['p99_ms']} max {r['max_ms']} ms, {r['errors']} errors, generator "
            f"{r['generator_cpu_share']:.0%} CPU, server {r['server_cpu_share']:.0%}, "
            f"load {r['load_average'][-1]} -> {'held' if r['held'] else 'missed'}")


async def run_all(url: str, admin: str, server_pid: int, fleet: Path, endpoints: int,
                  interval: float, seconds: float, change: float, search_seconds: float,
                  search_steps: int, priority: int, say: Callable[[str], None]) -> dict:
    pool = Pool.for_url(url)
    creds: list[str] = json.loads(fleet.read_text()) if fleet.exists() else []
    reused = len(creds)
    enrolled: dict = {"reused": reused, "endpoints": 0, "seconds": 0.0}

    async def grow(n: int) -> None:
        if n > len(creds):
            t = time.perf_counter()
            creds.extend(await enroll(pool, admin, len(creds), n - len(creds)))
            fleet.write_text(json.dumps(creds))
            enrolled["seconds"] += time.perf_counter() - t
            enrolled["endpoints"] = len(creds) - reused
            say(f"  enrolled {enrolled['endpoints']} endpoints in "
                f"{enrolled['seconds']:.1f} s ({reused} kept from an earlier run)")

    await grow(endpoints)
    main = await measure_phase(pool, creds[:endpoints], interval, seconds, change, server_pid)
    say(_line(main))
    tried: list[dict] = []
    if search_steps:
        say(f"search: the largest fleet whose p99 stays under {TARGET_P99_MS:.0f} ms "
            f"({search_seconds:.0f} s runs)")
        tried = await search(pool, creds, grow, interval, search_seconds, change, server_pid,
                             endpoints if main["held"] else endpoints // 2,
                             None if main["held"] else endpoints, search_steps, say)
    favoured = None
    if priority:
        say(f"again with the server and this generator at nice -{priority} (the rest of "
            "the machine gets what they leave)")
        with _niced(priority, server_pid):
            favoured = await measure_phase(pool, creds[:endpoints], interval, seconds,
                                           change, server_pid, seed=7)
        favoured["nice"] = -priority
        say(_line(favoured))
    pool.close()
    held = [r["endpoints"] for r in tried if r["held"]] + ([endpoints] if main["held"] else [])
    if enrolled["seconds"]:
        enrolled["per_s"] = round(enrolled["endpoints"] / enrolled["seconds"])
    return {"enrolled": enrolled, "main": main, "search": tried, "favoured": favoured,
            "largest_held": max(held) if held else None,
            "connections_opened": pool.opened}


def measure(work: Path, endpoints: int = 10_000, interval: float = 60, *, seconds: float = 60,
            change: float = 1.0, search_seconds: float = 15, search_steps: int = 4,
            fresh: bool = False, priority: int = 0,
            say: Callable[[str], None] = print) -> dict:
    """The main run and the search against a server on WORK/server. The enrolled fleet
    (its catalog and WORK/fleet.json, the credentials) is kept for the next run, which
    enrolls only the endpoints it lacks; `fresh` starts over."""
    data, fleet = work / "server", work / "fleet.json"
    if fresh or not fleet.exists() or not (data / "catalog.sqlite").exists():
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    proc, url = start_server(data)
    try:
        admin = (data / "admin.token").read_text().strip()
        with _runner() as runner:
            out = runner.run(run_all(url, admin, proc.pid, fleet, endpoints, interval,
                                     seconds, change, search_seconds, search_steps,
                                     priority, say))
    finally:
        proc.kill()
        proc.wait()
    return {**out, "target_p99_ms": TARGET_P99_MS, "connections": CONNECTIONS,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": len(os.sched_getaffinity(0)), "search_seconds": search_seconds}


@contextlib.contextmanager
def _niced(priority: int, server_pid: int) -> Iterator[None]:
    """The server (all its threads) and this process at nice -PRIORITY (needs root), for
    a run that shows the server given the CPU the target assumes: on a machine shared
    with other work, it otherwise gets a share like every other busy process."""
    pids = [int(t) for t in os.listdir(f"/proc/{server_pid}/task")] + [os.getpid()]
    before = {pid: os.getpriority(os.PRIO_PROCESS, pid) for pid in pids}
    for pid in pids:
        os.setpriority(os.PRIO_PROCESS, pid, -priority)
    try:
        yield
    finally:
        for pid, value in before.items():
            with contextlib.suppress(ProcessLookupError):
                os.setpriority(os.PRIO_PROCESS, pid, value)


def _runner() -> asyncio.Runner:
    try:
        import uvloop  # the server's event loop too (uvicorn's loop="uvloop")
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


LONG = {"seconds": 600, "search_steps": 0}  # --long: past the caches' 5 minutes


def save(results: dict, command: str, long: bool = False) -> None:
    """bench/openloop-results.json, which BENCHMARKS.md's section is made from. A
    `--long` run adds its row to what the last short run saved."""
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if long:
        row = {**results["main"], "date": results["date"], "command": command}
        results = {**saved, "long": row} if saved else {**results, "long": row}
    else:
        results = {**results, "command": command, "long": saved.get("long")}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--endpoints", type=int, default=10_000)
    ap.add_argument("--interval", type=float, default=60, help="seconds between an "
                    "endpoint's check-ins, on average (default 60)")
    ap.add_argument("--seconds", type=float, default=60, help="length of the main run")
    ap.add_argument("--inventory-changes", type=float, default=1.0, metavar="FRACTION",
                    help="share of check-ins whose inventory differs from the last one "
                         "(default 1: free disk space moves, as on a real endpoint)")
    ap.add_argument("--search-seconds", type=float, default=15)
    ap.add_argument("--search-steps", type=int, default=4)
    ap.add_argument("--no-search", action="store_true")
    ap.add_argument("--long", action="store_true",
                    help="a 10-minute run instead (past the server's 5-minute caches, no "
                         "search), added as a row to what the last short run saved")
    ap.add_argument("--priority", type=int, default=0, metavar="N",
                    help="after the search, the main run again with the server and the "
                         "generator at nice -N (root): the server given the CPU it would "
                         "have on a machine of its own")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "openloop")
    ap.add_argument("--fresh", action="store_true",
                    help="enroll a new fleet instead of the one kept in WORK")
    args = ap.parse_args()
    settings = {"seconds": args.seconds, "search_seconds": args.search_seconds,
                "search_steps": 0 if args.no_search else args.search_steps,
                **(LONG if args.long else {})}
    out = measure(args.work, args.endpoints, args.interval,
                  change=args.inventory_changes, fresh=args.fresh, priority=args.priority,
                  **settings)
    save(out, " ".join(["python -m bench.openloop", *sys.argv[1:]]), long=args.long)
    report.update_sections(ROOT)
    print(json.dumps(out, indent=2))
    print(f"wrote {RESULTS} and its section of {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()

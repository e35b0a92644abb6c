"""Check-ins per second from many simulated agents against one server process.

`python -m bench.checkins [--agents 1000] [--checkins 5000] [--concurrency 64]` starts a
server on loopback, enrolls the agents through the real API, then has them check in
(with inventory, like the real agent) and reports throughput and latency percentiles.
Closed loop (a fixed number in flight): how fast the server can go. `make bench` runs
the open-loop fleet instead (bench/openloop.py), which says how a fleet is served; this
module also gives the other benches their server and inventories.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    data.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).with_name("strata"))
    # The log beside the data directory: the server refuses a new one holding other files.
    proc = subprocess.Popen([exe, "server", "--data", str(data), "--listen",
                             f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=open(data.with_name(data.name + ".log"), "w"))  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120  # a loaded machine takes 20 s and more to start it
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/api/v1/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start")


def inventory(i: int) -> dict:
    return {"hostname": f"sim-{i:05d}", "os": "debian", "os_version": "12",
            "hardware": {"vendor": "Simulated", "model": f"Model {i % 7}"},
            "cpu": {"model": "sim", "count": 4}, "ram_bytes": 8 << 30,
            "disks": [{"mount": "/", "total_bytes": 256 << 30, "free_bytes": 100 << 30}]}


async def run_load(url: str, admin: str, agents: int, checkins: int,
                   concurrency: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        tok = (await http.post("/api/v1/admin/tokens", json={"uses": agents, "expires": "1h"},
                               headers={"Authorization": f"Bearer {admin}"})).json()["token"]
        sem = asyncio.Semaphore(concurrency)

        async def enroll(i: int) -> str:
            async with sem:
                r = await http.post("/api/v1/agent/enroll", json={
                    "token": tok, "hostname": f"sim-{i:05d}", "os": "debian",
                    "inventory": inventory(i)})
                return r.json()["credential"]
        creds = await asyncio.gather(*(enroll(i) for i in range(agents)))
        latencies: list[float] = []
        errors = 0

        async def checkin(n: int) -> None:
            nonlocal errors
            i = n % agents
            async with sem:
                t = time.perf_counter()
                try:
                    r = await http.post("/api/v1/agent/checkin",
                                        json={"inventory": inventory(i), "status": {}},
                                        headers={"Authorization": f"Bearer {creds[i]}"})
                    ok = r.status_code == 200
                except httpx.TransportError:
                    ok = False
                latencies.append(time.perf_counter() - t)
                errors += not ok
        started = time.perf_counter()
        await asyncio.gather(*(checkin(n) for n in range(checkins)))
        elapsed = time.perf_counter() - started
    qs = statistics.quantiles(latencies, n=100)
    return {"agents": agents, "checkins": checkins, "concurrency": concurrency,
            "seconds": round(elapsed, 2), "checkins_per_second": round(checkins / elapsed, 1),
            "p50_ms": round(qs[49] * 1000, 1), "p99_ms": round(qs[98] * 1000, 1),
            "errors": errors}


def measure(agents: int = 1000, checkins: int = 5000, concurrency: int = 64) -> dict:
    data = Path(tempfile.mkdtemp(prefix="strata-checkins-"))
    proc, url = start_server(data)
    try:
        admin = (data / "admin.token").read_text().strip()
        return asyncio.run(run_load(url, admin, agents, checkins, concurrency))
    finally:
        proc.kill()
        proc.wait()
        if os.environ.get("STRATA_BENCH_KEEP"):
            print(f"kept {data}")
        else:
            shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--checkins", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("STRATA_NO_PROGRESS", "1")
    print(json.dumps(measure(args.agents, args.checkins, args.concurrency), indent=2))


if __name__ == "__main__":
    main()

"""Several server processes on one PostgreSQL catalog: the open-loop check-in load
(bench/openloop.py) against one process and against two, and many agents centralizing
small trees at once against two processes.

    .venv/bin/python -m bench.scaleout [--endpoints 3000] [--seconds 20] [--steps 3]
                                        [--agents 100] [--tree-kib 512]

Starts its own PostgreSQL cluster (Debian's `postgresql`, as the tests do:
tests/pg_fixture.py) and the servers on loopback, sharing one data directory and a
local store. Check-ins: each process count gets a fresh database and fleet; the main run
at --endpoints, then a short search for the largest fleet whose p99 stays under 200 ms;
requests go to a process by a hash of the credential, as nginx's `hash
$http_authorization` does (docs/deploy/nginx-strata.conf). Agents: --agents real `strata
agent backup` processes started at once, half on each process, each tree a shared part
and an own part; reported: the wall time until all committed, the throughput, and the
p50/p99 of the agents' own times. Writes bench/scaleout-results.json. Not part of `make
bench`: it starts a database cluster and a hundred processes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from .openloop import TARGET_P99_MS, Pool, _line, _runner, enroll, measure_phase, search
from .tools import ROOT

RESULTS = Path(__file__).parent / "scaleout-results.json"
EXE = str(Path(sys.executable).with_name("strata"))


def _cluster():
    sys.path.insert(0, str(ROOT / "tests"))
    from pg_fixture import PgCluster, find_pg_bin  # the tests' throw-away cluster

    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise SystemExit("PostgreSQL is not installed (Debian package postgresql)")
    return PgCluster(bin_dir).start()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_servers(data: Path, catalog: str, count: int) -> list[tuple[subprocess.Popen, str]]:
    """`count` processes on one data directory and catalog; the first creates the store."""
    data.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(count):
        port = _free_port()
        proc = subprocess.Popen([EXE, "server", "--data", str(data), "--catalog", catalog,
                                 "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                stderr=open(data.parent / f"server-{k}.log", "w"))  # noqa: SIM115
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"server {k} exited: see {data.parent}/server-{k}.log")
            try:
                if httpx.get(url + "/api/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        out.append((proc, url))
    return out


class Spread:
    """A pool per process; a request goes to the process its credential hashes to."""

    def __init__(self, urls: list[str]):
        self.pools = [Pool.for_url(u) for u in urls]

    @property
    def opened(self) -> int:
        return sum(p.opened for p in self.pools)

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        start = raw.find(b"Authorization: ")
        key = raw[start:raw.find(b"\r\n", start)] if start >= 0 else b""
        pick = int.from_bytes(hashlib.blake2b(key, digest_size=4).digest()) % len(self.pools)
        return await self.pools[pick].send(raw)

    def close(self) -> None:
        for p in self.pools:
            p.close()


async def checkins(urls: list[str], pids: list[int], admin: str, endpoints: int,
                   seconds: float, steps: int, say) -> dict:
    spread = Spread(urls)
    creds: list[str] = []

    async def grow(n: int) -> None:
        if n > len(creds):
            creds.extend(await enroll(spread.pools[0], admin, len(creds), n - len(creds)))

    await grow(endpoints)
    main = await measure_phase(spread, creds[:endpoints], 60, seconds, 1.0, pids)
    say(_line(main))
    tried = await search(spread, creds, grow, 60, seconds, 1.0, pids,
                         endpoints if main["held"] else endpoints // 2,
                         None if main["held"] else endpoints, steps, say) if steps else []
    spread.close()
    held = [r["endpoints"] for r in tried if r["held"]] + ([endpoints] if main["held"] else [])
    return {"main": main, "search": tried, "largest_held": max(held) if held else None}


def _tree(root: Path, shared: bytes, own: int, rng: random.Random) -> int:
    root.mkdir(parents=True, exist_ok=True)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/hostname").write_text(f"{root.name}\n")
    for i in range(0, len(shared), 64 << 10):  # shared software: the same in every tree
        (root / f"opt-{i >> 16:03d}.bin").write_bytes(shared[i:i + (64 << 10)])
    (root / "home").mkdir(exist_ok=True)
    (root / "home/own.bin").write_bytes(rng.randbytes(own))
    return len(shared) + own


def agents_at_once(work: Path, urls: list[str], admin: str, agents: int, tree_kib: int,
                   say) -> dict:
    """`agents` enrolled (through the library, as `strata agent enroll` does), then as
    many `strata agent backup` processes started at once."""
    from concurrent.futures import ThreadPoolExecutor

    from strata.agent.enrollment import enroll as enroll_agent
    from strata.agent.state import AgentState

    rng = random.Random(3)
    shared = rng.randbytes(tree_kib * 1024 // 2)
    token = httpx.post(urls[0] + "/api/v1/admin/tokens", json={"uses": agents, "expires": "2h"},
                       headers={"Authorization": f"Bearer {admin}"}, timeout=60).json()["token"]
    total = 0
    states = []
    for i in range(agents):
        root = work / f"agent-{i:03d}" / "root"
        total += _tree(root, shared, tree_kib * 1024 // 2, rng)
        states.append((root, work / f"agent-{i:03d}" / "state", urls[i % len(urls)]))

    def one(item: tuple[Path, Path, str]) -> None:
        root, state, url = item
        enroll_agent(AgentState(state), server=url, token=token, root=root)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, states))
    say(f"  {agents} agents enrolled; starting {agents} `strata agent backup` at once")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env["STRATA_NO_PROGRESS"] = "1"
    t0 = time.monotonic()
    procs = [(subprocess.Popen([EXE, "agent", "backup", "--state", str(state), "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env),
              time.monotonic()) for _, state, _ in states]
    times, failures, sent = [], 0, 0
    for proc, started in procs:
        out, err = proc.communicate(timeout=1800)
        times.append(time.monotonic() - started)
        try:
            doc = json.loads(out)
            ok = proc.returncode == 0 and not doc["result"]["errors"]
            sent += int(doc["result"]["bytes_sent"])
        except (ValueError, KeyError, TypeError):
            ok = False
        failures += not ok
    wall = time.monotonic() - t0
    times.sort()
    return {"agents": agents, "tree_bytes_each": total // agents, "wall_s": round(wall, 1),
            "failures": failures, "commits_per_s": round((agents - failures) / wall, 2),
            "tree_mib_per_s": round(total / wall / (1 << 20), 2),
            "bytes_sent_total": sent,
            "agent_p50_s": round(times[len(times) // 2], 1),
            "agent_p99_s": round(times[min(len(times) - 1, int(0.99 * len(times)))], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--endpoints", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--tree-kib", type=int, default=512)
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "scaleout")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    cluster = _cluster()
    results: dict = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                     "cpus": len(os.sched_getaffinity(0)), "target_p99_ms": TARGET_P99_MS,
                     "command": " ".join(["python -m bench.scaleout", *sys.argv[1:]]),
                     "checkins": {}, "load_before": os.getloadavg()[0]}
    try:
        for n in (int(x) for x in args.processes.split(",") if x):
            print(f"check-ins against {n} process(es), PostgreSQL catalog")
            work = args.work / f"p{n}"
            servers = start_servers(work / "data", cluster.new_database(f"p{n}"), n)
            admin = (work / "data" / "admin.token").read_text().strip()
            try:
                with _runner() as runner:
                    results["checkins"][str(n)] = runner.run(checkins(
                        [u for _, u in servers], [p.pid for p, _ in servers], admin,
                        args.endpoints, args.seconds, args.steps, print))
            finally:
                for proc, _ in servers:
                    proc.kill()
                    proc.wait()
        if args.agents:
            print(f"{args.agents} agents centralizing at once against 2 processes")
            work = args.work / "agents"
            servers = start_servers(work / "data", cluster.new_database("agents"), 2)
            admin = (work / "data" / "admin.token").read_text().strip()
            try:
                results["agents"] = agents_at_once(work, [u for _, u in servers], admin,
                                                   args.agents, args.tree_kib, print)
            finally:
                for proc, _ in servers:
                    proc.kill()
                    proc.wait()
            print(json.dumps(results["agents"]))
    finally:
        cluster.stop()
    results["load_after"] = os.getloadavg()[0]
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

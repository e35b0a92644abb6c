"""Console page loads with a large fleet in the catalog.

`python -m bench.console [--endpoints 1000] [--snapshots 10] [--packages 1500] [--runs 30]`
starts a server on loopback, enrolls the endpoints through the real API (with an agent's
inventory), gives each CVD snapshot records and installed packages, makes a task over the
whole fleet, signs in as an administrator like a browser (cookie, CSRF token), waits for
the background reports' first computation, then times each page over keep-alive HTTP:
median and 95th percentile.
Writes bench/console-results.json, which `make bench` puts into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from .checkins import inventory, start_server

PASSWORD = "bench password 123"
RESULTS = Path(__file__).parent / "console-results.json"  # read by bench.run's report


def _enroll(url: str, admin: str, count: int) -> list[str]:
    api = {"Authorization": f"Bearer {admin}"}
    with httpx.Client(base_url=url, timeout=60) as http:
        token = http.post("/api/v1/admin/tokens", headers=api,
                          json={"uses": None, "expires": None}).json()["token"]
        ids = []
        for i in range(count):
            resp = http.post("/api/v1/agent/enroll", json={
                "token": token, "hostname": f"sim-{i:05d}", "os": "debian",
                "inventory": inventory(i)})
            resp.raise_for_status()
            ids.append(resp.json()["endpoint_id"])
        http.post("/api/v1/admin/users", headers=api, json={
            "name": "bench", "role": "administrator", "password": PASSWORD}).raise_for_status()
    return ids


def _add_snapshots(data: Path, per_cvd: int) -> None:
    """Snapshot records straight into the catalog (what the pages read; a real
    centralization of each would only take longer to set up)."""
    from sqlalchemy import select

    from strata.server.catalog.db import open_catalog
    from strata.server.catalog.models import Cvd, SnapshotRecord

    engine, sessions = open_catalog(f"sqlite:///{data / 'catalog.sqlite'}")
    start = datetime.now(UTC) - timedelta(days=per_cvd)
    with sessions() as db:
        for cvd in db.scalars(select(Cvd)):
            for k in range(per_cvd):
                db.add(SnapshotRecord(id=f"{cvd.id:08x}{k:056x}", cvd_id=cvd.id,
                                      time=start + timedelta(days=k), files=50_000,
                                      bytes_total=20 << 30, bytes_new=64 << 20))
        db.commit()
    engine.dispose()


def _add_packages_and_a_task(data: Path, per_endpoint: int) -> None:
    """Installed packages for every endpoint (what agents send: most packages on every
    machine, at one of a few versions) and an assignment task over the whole fleet, with
    its endpoints at every stage; straight into the catalog, as the snapshot records."""
    from sqlalchemy import insert, select

    from strata.server.catalog.db import open_catalog
    from strata.server.catalog.models import (
        Assignment,
        Endpoint,
        InstalledPackage,
        SoftwareList,
        Task,
        TaskMember,
    )

    engine, sessions = open_catalog(f"sqlite:///{data / 'catalog.sqlite'}")
    states = ["applied", "applied", "downloading", "ready", "assigned", "failed"]
    with sessions() as db:
        ids = list(db.scalars(select(Endpoint.id).order_by(Endpoint.id)))
        names = ["openssl", "bash", "libc6"] + [f"pkg-{k:04d}" for k in range(per_endpoint - 3)]
        for i, eid in enumerate(ids):
            db.execute(insert(InstalledPackage), [
                {"endpoint_id": eid, "name": n, "arch": "amd64",
                 "version": f"1.{(i + k) % 3}-deb12u{k % 5}", "manager": "dpkg"}
                for k, n in enumerate(names)])
            db.add(SoftwareList(endpoint_id=eid, digest=f"{i:064x}", packages=len(names)))
        task = Task(kind="assign", params={"all": True, "base": "corp-os:2"}, endpoints=ids)
        db.add(task)
        db.flush()
        for i, eid in enumerate(ids):
            db.add(Assignment(endpoint_id=eid, task_id=task.id, state=states[i % len(states)],
                              percent=50.0, app_ids=[], applied_layers=[], operation={}))
            db.add(TaskMember(task_id=task.id, endpoint_id=eid, previous={}, target={}))
        db.commit()
    engine.dispose()


def _wait_for_report(http: httpx.Client, path: str, timeout: float = 300) -> float:
    """A background report's first computation: seconds until the page shows it."""
    t = time.perf_counter()
    while 'data-testid="computing"' in http.get(path).text:
        if time.perf_counter() - t > timeout:
            raise TimeoutError(f"{path} still computing after {timeout} s")
        time.sleep(0.2)
    return round(time.perf_counter() - t, 1)


def _sign_in(http: httpx.Client) -> None:
    page = http.get("/login").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf, page
    resp = http.post("/login", data={"name": "bench", "password": PASSWORD,
                                     "csrf": csrf.group(1)})
    assert resp.status_code == 303, resp.text


def _time(http: httpx.Client, path: str, runs: int, headers: dict | None = None) -> dict:
    t = time.perf_counter()
    http.get(path, headers=headers).raise_for_status()  # the first load: caches are cold
    first = (time.perf_counter() - t) * 1000
    ms = []
    for _ in range(runs):
        t = time.perf_counter()
        resp = http.get(path, headers=headers)
        ms.append((time.perf_counter() - t) * 1000)
        resp.raise_for_status()
    ms.sort()
    return {"first_ms": round(first, 1), "median_ms": round(statistics.median(ms), 1),
            "p95_ms": round(ms[max(0, int(len(ms) * 0.95) - 1)], 1), "bytes": len(resp.content)}


def measure(endpoints: int, snapshots: int, runs: int, packages: int = 1500) -> dict:
    work = Path(tempfile.mkdtemp(prefix="strata-bench-console-"))
    proc = None
    try:
        data = work / "data"
        proc, url = start_server(data)
        admin = (data / "admin.token").read_text().strip()
        t = time.perf_counter()
        ids = _enroll(url, admin, endpoints)
        _add_snapshots(data, snapshots)
        _add_packages_and_a_task(data, packages)
        setup = time.perf_counter() - t
        with httpx.Client(base_url=url, timeout=60, follow_redirects=False) as http:
            _sign_in(http)
            computed = {"/reports/software": _wait_for_report(http, "/reports/software"),
                        "/reports/storage": _wait_for_report(http, "/reports/storage")}
            tid = re.search(r'<a href="/tasks/(\d+)">', http.get("/tasks").text)
            assert tid, "no task"
            pages = {
                "/ (dashboard)": _time(http, "/", runs),
                "/endpoints (first 200)": _time(http, "/endpoints", runs),
                "/endpoints?q=sim-0042 (htmx rows)": _time(
                    http, "/endpoints?q=sim-0042", runs, {"HX-Request": "true"}),
                "/endpoints/ID (detail)": _time(http, f"/endpoints/{ids[len(ids) // 2]}",
                                                runs),
                "/tasks": _time(http, "/tasks", runs),
                "/tasks/ID (1,000 endpoints)": _time(http, f"/tasks/{tid.group(1)}", runs),
                "/reports/software?package=openssl (1,000 endpoints, 200 shown)": _time(
                    http, "/reports/software?package=openssl", runs),
                "/reports/software (summary)": _time(http, "/reports/software", runs),
                "/reports/storage (1,000 CVDs)": _time(http, "/reports/storage", runs),
                "/reports/software?endpoint=ID": _time(
                    http, f"/reports/software?endpoint={ids[7]}", runs),
                "/compliance (1,000 endpoints)": _time(http, "/compliance", runs),
                "/audit (200 records)": _time(http, "/audit", runs),
                "/users": _time(http, "/users", runs),
            }
        return {"endpoints": endpoints, "snapshots_per_endpoint": snapshots, "runs": runs,
                "packages_per_endpoint": packages, "setup_seconds": round(setup, 1),
                "background_reports_seconds": computed, "pages": pages}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.console", description=__doc__)
    p.add_argument("--endpoints", type=int, default=1000)
    p.add_argument("--snapshots", type=int, default=10, help="snapshot records per CVD")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--packages", type=int, default=1500, help="installed packages per "
                   "endpoint")
    args = p.parse_args()
    result = measure(args.endpoints, args.snapshots, args.runs, args.packages)
    result["date"] = datetime.now(UTC).strftime("%Y-%m-%d")
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

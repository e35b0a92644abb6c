"""Centralization and restore through a server whose store is in S3 (moto's server on
loopback) against the same server on its local store, for the same tree.

    .venv/bin/python -m bench.s3 [--usr-bytes 300M] [--rounds 3] [--work bench/work/s3]

Not part of `make bench` (moto is a test double: its figures bound what Strata's S3 path
costs on this machine, not what AWS S3 would do). Prints a JSON document: per store, the
seconds and MiB/s of `agent backup` (first centralization of the tree) and of `agent
restore` of the whole tree, with the server's and moto's CPU seconds; the median of
`--rounds` runs of each, local and S3 alternately. About a minute per round for 300M.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from bench.data import copy_usr
from bench.fleet import drop_caches, tree_bytes
from bench.run import size

EXE = str(Path(sys.executable).with_name("strata"))
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def strata(env: dict[str, str], *args: object) -> dict:
    out = subprocess.run([EXE, *map(str, args), "--json"], check=True, text=True, env=env,
                         stdout=subprocess.PIPE).stdout
    return json.loads(out)


def one_store(tree: Path, work: Path, env: dict[str, str], store_args: list[str]) -> dict:
    data = work / "server"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(work / "server.log", "w") as log:
        server = subprocess.Popen([EXE, "server", "--data", str(data), "--listen",
                                   f"127.0.0.1:{port}", *store_args], env=env,
                                  stdout=log, stderr=log)
    try:
        wait_http(url + "/api/v1/health", server)
        token = strata(env, "token", "create", "--server", url, "--admin-token-file",
                       data / "admin.token")["token"]
        state = work / "agent"
        strata(env, "agent", "enroll", "--server", url, "--token", token, "--root", tree,
               "--state", state)
        total = tree_bytes(tree)
        row: dict = {"tree_bytes": total}
        for step, args in [("centralize", ["agent", "backup", "--state", state]),
                           ("restore", ["agent", "restore", *sorted(os.listdir(tree)),
                                        "--to", work / "restored", "--state", state])]:
            drop_caches()
            cpu, t = cpu_seconds(server.pid), time.monotonic()
            strata(env, *args)
            seconds = time.monotonic() - t
            row[step] = {"seconds": round(seconds, 2),
                         "mib_per_s": round(total / seconds / (1 << 20), 1),
                         "server_cpu_s": round(cpu_seconds(server.pid) - cpu, 2)}
        return row
    finally:
        server.terminate()
        server.wait(timeout=60)


def measure(usr_bytes: int, work: Path, rounds: int = 3) -> dict:
    tree = work / "tree"
    if not tree.exists():  # kept for the next run with the same --work
        work.mkdir(parents=True, exist_ok=True)
        copy_usr(Path("/usr"), tree, usr_bytes)
    port = free_port()
    env = {**os.environ, **AWS, "STRATA_NO_PROGRESS": "1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_http(env["AWS_ENDPOINT_URL"], moto)
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.session.Session().client("s3", endpoint_url=env["AWS_ENDPOINT_URL"],
                                       region_name="us-east-1",
                                       aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
                                       aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"]
                                       ).create_bucket(Bucket=bucket)
        runs: dict[str, list[dict]] = {"local": [], "s3": []}
        for r in range(rounds):  # alternately, so a burst of other load hits both alike
            for name, args in [("local", []), ("s3", ["--store", f"s3://{bucket}/bench{r}"])]:
                run_dir = work / name
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.mkdir(parents=True)
                moto_cpu = cpu_seconds(moto.pid)
                row = one_store(tree, run_dir, env, args)
                row["moto_cpu_s"] = round(cpu_seconds(moto.pid) - moto_cpu, 2)
                runs[name].append(row)
                shutil.rmtree(run_dir, ignore_errors=True)
        out: dict = {"rounds": rounds, "load_average": os.getloadavg()}
        for name, rows in runs.items():
            median = {step: sorted(rows, key=lambda row: row[step]["seconds"])[len(rows) // 2][step]
                      for step in ("centralize", "restore")}
            out[name] = {"tree_bytes": rows[0]["tree_bytes"], **median, "runs": rows}
        return out
    finally:
        moto.terminate()
        moto.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--usr-bytes", type=size, default=size("300M"))
    ap.add_argument("--work", type=Path, default=Path("bench/work/s3"))
    ap.add_argument("--rounds", type=int, default=3, help="pairs of runs; medians reported")
    args = ap.parse_args()
    print(json.dumps(measure(args.usr_bytes, args.work, args.rounds), indent=2))


if __name__ == "__main__":
    main()

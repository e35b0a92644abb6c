"""Centralization over loopback against a local store backup of the same tree, and the
bytes four endpoints that share an OS put on the wire.

`python -m bench.fleet --corpus DIR` (the bench corpus by default) reports:
- throughput of `strata agent backup` to a server on 127.0.0.1 against
  `strata store backup` of the same tree into a local store (network overhead: the
  median of three pairs run alternately);
- for endpoints 2-4 (the corpus plus their own data), bytes on the wire against their size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.checkins import start_server

EXE = str(Path(sys.executable).with_name("strata"))
ENV = {**os.environ, "STRATA_NO_PROGRESS": "1"}


def strata(*args: str) -> dict:
    out = subprocess.run([EXE, *args, "--json"], check=True, text=True, env=ENV,
                         stdout=subprocess.PIPE).stdout
    return json.loads(out)


def drop_caches() -> None:
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def endpoint_tree(corpus: Path, root: Path, seed: int, own_bytes: int) -> int:
    """The corpus (hard-linked: same bytes, no copy) plus this endpoint's own files."""
    shutil.copytree(corpus, root, symlinks=True, copy_function=os.link)
    rng = random.Random(seed)
    own = root / "home" / f"user{seed}"
    own.mkdir(parents=True)
    written = 0
    while written < own_bytes:
        n = min(own_bytes - written, 1 << 20)
        (own / f"doc-{written}.bin").write_bytes(rng.randbytes(n))
        written += n
    return written


def tree_bytes(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _local_backup(corpus: Path, store: Path) -> float:
    shutil.rmtree(store, ignore_errors=True)
    strata("store", "init", str(store))
    drop_caches()
    t = time.monotonic()
    strata("store", "backup", str(store), str(corpus))
    return time.monotonic() - t


def _centralize(corpus: Path, work: Path, endpoints: int, own_bytes: int) -> list[dict]:
    """A fresh server on loopback; the corpus centralized as endpoint 1, then endpoints
    2..`endpoints` (the corpus plus their own files)."""
    for d in ["server", *(f"state{i}" for i in range(endpoints)),
              *(f"ep{i}" for i in range(1, endpoints))]:
        shutil.rmtree(work / d, ignore_errors=True)
    proc, url = start_server(work / "server")
    try:
        admin = work / "server/admin.token"
        token = strata("token", "create", "--uses", str(endpoints), "--server", url,
                       "--admin-token-file", str(admin))["token"]
        rows = []
        for i in range(endpoints):
            root = corpus if i == 0 else work / f"ep{i}"
            own = 0 if i == 0 else endpoint_tree(corpus, root, i, own_bytes)
            state = work / f"state{i}"
            strata("agent", "enroll", "--server", url, "--token", token, "--root", str(root),
                   "--state", str(state))
            drop_caches()
            t = time.monotonic()
            out = strata("agent", "backup", "--state", str(state))
            rows.append({"endpoint": i + 1, "tree_bytes": out["result"]["bytes_total"],
                         "own_bytes": own, "bytes_sent": out["result"]["bytes_sent"],
                         "seconds": round(time.monotonic() - t, 2)})
        return rows
    finally:
        proc.kill()
        proc.wait()


def measure(corpus: Path, work: Path, own_bytes: int = 8 << 20, rounds: int = 3) -> dict:
    """`rounds` pairs of (local backup, centralization of the same tree), alternating, so
    that one disturbed run cannot decide the overhead: the median pair is reported, with
    every pair; the last round goes on with endpoints 2-4."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pairs, rows = [], []
    for r in range(rounds):
        local_s = _local_backup(corpus, work / "local")
        rows = _centralize(corpus, work, 4 if r == rounds - 1 else 1, own_bytes)
        net_s = rows[0]["seconds"]
        pairs.append({"local_backup_seconds": round(local_s, 2), "centralize_seconds": net_s,
                      "network_overhead": round(net_s / local_s - 1, 3)})
    median = sorted(pairs, key=lambda p: p["network_overhead"])[len(pairs) // 2]
    return {"corpus_bytes": tree_bytes(corpus), **median, "rounds": pairs,
            "endpoints": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", type=Path, default=Path("bench/work/data/src"))
    ap.add_argument("--work", type=Path, default=Path("bench/work/fleet"))
    args = ap.parse_args()
    print(json.dumps(measure(args.corpus, args.work), indent=2))


if __name__ == "__main__":
    main()

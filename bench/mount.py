"""Mounting a snapshot: cold-read throughput of one file through the FUSE mount against a
restore of the same file, and what reading it fetched from the store.

    .venv/bin/python -m bench.mount [--file-mib 256] [--others 64] [--keep-work]

A store holds one snapshot: one large file of random bytes (incompressible, so zstd does
not flatter either path) among `--others` files of 4 MiB. Each measurement starts cold:
the store's packs are dropped from the page cache (posix_fadvise DONTNEED, file by file,
which leaves the rest of the machine's cache alone) and the mount is fresh, so every
chunk is read from disk and decoded. Measured, best of five (the two taking turns):

- restore: `strata store restore STORE SNAP DIR --include FILE` (the command's own
  process, written to disk; its start-up is included);
- mount: `cat`-like 1 MiB reads of the file through `strata store mount`, and the chunks
  and bytes the mount says it fetched (only that file's must be);
- the same two through a server on loopback (an agent centralizes the tree first):
  `strata endpoint export --path FILE --to DIR` and `strata endpoint mount`.

Saves bench/mount-results.json, which bench/report.py renders in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from strata.engine.snapshot_tree import SnapshotTree
from strata.store.repository import Store

from .tools import ROOT

WORK = ROOT / "bench" / "work" / "mount"
RESULTS = ROOT / "bench" / "mount-results.json"
STRATA = Path(sys.executable).parent / "strata"
MIB = 1 << 20
ROUNDS = 5  # best of, restore and mount taking turns (the machine may be shared)
FETCHED = re.compile(r"fetched (\d+) chunks \(.+?\) in (\d+) request")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env["STRATA_NO_PROGRESS"] = "1"
    return env


def strata(*args: object) -> str:
    return subprocess.run([str(STRATA), *map(str, args)], env=_env(), check=True,
                          capture_output=True, text=True).stdout


def drop_cache(folder: Path) -> None:
    """Evict `folder`'s files from the page cache (they are clean: written and synced)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def build(work: Path, file_mib: int, others: int) -> tuple[Path, str]:
    src, store = work / "src", work / "store"
    shutil.rmtree(work, ignore_errors=True)
    (src / "other").mkdir(parents=True)
    with open(src / "big.bin", "wb") as f:
        for _ in range(file_mib):
            f.write(os.urandom(MIB))
    for i in range(others):
        (src / "other" / f"f{i:03d}.bin").write_bytes(os.urandom(4 * MIB))
    strata("store", "init", store)
    sid = json.loads(strata("store", "backup", store, src, "--json"))["snapshot"]
    return store, sid


def restore_seconds(store: Path, sid: str, work: Path) -> float:
    target = work / "restored"
    shutil.rmtree(target, ignore_errors=True)
    drop_cache(store)
    t0 = time.perf_counter()
    strata("store", "restore", store, sid, target, "--include", "big.bin")
    return time.perf_counter() - t0


def mount_read(mount_cmd: list[object], mnt: Path, drop: Path) -> tuple[float, int, int, int]:
    """Seconds to read big.bin through a fresh mount, bytes read, chunks and requests
    the mount fetched."""
    mnt.mkdir(exist_ok=True)
    drop_cache(drop)
    proc = subprocess.Popen([str(STRATA), *map(str, mount_cmd), str(mnt)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(60) or not proc.stdout.readline().startswith("mounted"):
            raise RuntimeError(f"mount did not start: {proc.stderr.read()}")
        t0 = time.perf_counter()
        n = 0
        with open(mnt / "big.bin", "rb", buffering=0) as f:
            while piece := f.read(MIB):
                n += len(piece)
        seconds = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    m = FETCHED.search(out)
    if not m:
        raise RuntimeError(f"no fetch figures from the mount: {out} {err}")
    return seconds, n, int(m.group(1)), int(m.group(2))


def timed(*args: object) -> float:
    t0 = time.perf_counter()
    strata(*args)
    return time.perf_counter() - t0


def through_server(work: Path, src: Path) -> dict:
    """The same file through a server on loopback: `strata endpoint mount` against
    `strata endpoint export --path big.bin` (the restore engine over the admin API)."""
    from .checkins import start_server

    proc, url = start_server(work / "server")
    try:
        admin = ["--server", url, "--admin-token-file", str(work / "server/admin.token")]
        token = json.loads(strata("token", "create", *admin, "--json"))["token"]
        state = work / "agent-state"
        strata("agent", "enroll", "--server", url, "--token", token, "--root", src,
               "--state", state)
        strata("agent", "backup", "--state", state)
        ep = json.loads((state / "credential.json").read_text())["endpoint_id"]
        store = work / "server" / "store"
        exports, mounts = [], []
        for i in range(ROUNDS):
            drop_cache(store)
            exports.append(timed("endpoint", "export", ep, "--snapshot", "latest", "--to",
                                 work / f"export{i}", "--path", "big.bin", *admin))
            shutil.rmtree(work / f"export{i}")
            mounts.append(mount_read(["endpoint", "mount", ep, *admin], work / "rmnt", store))
    finally:
        proc.kill()
        proc.wait()
    best = min(mounts)
    return {"export_seconds": round(min(exports), 3), "mount_seconds": round(best[0], 3),
            "mount_chunks_fetched": best[2], "mount_requests": best[3],
            "all_export_seconds": [round(x, 3) for x in exports],
            "all_mount_seconds": [round(m[0], 3) for m in mounts]}


def run(work: Path = WORK, file_mib: int = 256, others: int = 64, keep: bool = False) -> dict:
    store, sid = build(work, file_mib, others)
    snap_bytes = (file_mib + 4 * others) * MIB
    restores, mounts = [], []
    for _ in range(ROUNDS):
        restores.append(restore_seconds(store, sid, work))
        mounts.append(mount_read(["store", "mount", store, sid], work / "mnt", store))
    best = min(mounts)
    with Store.open(store) as st:
        snap = st.load_snapshot(sid)
        tree = SnapshotTree.of_store(st, snap)
        file_chunks = len({c for c, _ in tree.entry(tree.resolve("big.bin")).chunks})
        snapshot_chunks = len({c for _, ino in tree.walk() if not tree.is_dir(ino)
                               for c, _ in tree.entry(ino).chunks})
    doc = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": round(os.getloadavg()[1], 1),  # over the last 5 minutes
        "cpus": os.cpu_count(),
        "file_bytes": file_mib * MIB,
        "snapshot_bytes": snap_bytes,
        "snapshot_chunks": snapshot_chunks,
        "file_chunks": file_chunks,
        "restore_seconds": round(min(restores), 3),
        "restore_mib_s": round(file_mib / min(restores), 1),
        "mount_seconds": round(best[0], 3),
        "mount_mib_s": round(file_mib / best[0], 1),
        "mount_bytes_read": best[1],
        "mount_chunks_fetched": best[2],
        "mount_requests": best[3],
        "all_restore_seconds": [round(s, 3) for s in restores],
        "all_mount_seconds": [round(m[0], 3) for m in mounts],
    }
    remote = through_server(work, work / "src")
    remote["export_mib_s"] = round(file_mib / remote["export_seconds"], 1)
    remote["mount_mib_s"] = round(file_mib / remote["mount_seconds"], 1)
    doc["server"] = remote
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return doc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.mount", description=__doc__.split("\n")[0])
    p.add_argument("--file-mib", type=int, default=256)
    p.add_argument("--others", type=int, default=64)
    p.add_argument("--keep-work", action="store_true")
    args = p.parse_args(argv)
    print(json.dumps(run(WORK, args.file_mib, args.others, args.keep_work), indent=2))


if __name__ == "__main__":
    main()

"""Peak memory on a store of many chunks: `python -m bench.scale [--chunks 10000000]`.

Synthesizes a store holding N distinct chunks (tiny ones, so it is quick to build) and
one snapshot that references all of them, then runs check, backup, prune --dry-run and
stats against it as separate processes and reports each one's peak RSS. The index must
not need every chunk id in RAM, so the figures should stay flat as N grows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from strata.model.entry import Entry, EntryType
from strata.model.ids import content_id
from strata.model.manifest import encode_manifest
from strata.model.snapshot import Snapshot, now_iso
from strata.store.pack import PackWriter
from strata.store.repository import SNAPSHOT_AAD, Store

CHUNKS_PER_ENTRY = 10_000


def synthesize_store(path: Path, n_chunks: int) -> None:
    store = Store.init(path, compression="none")
    writer = store.new_pack_writer()
    entries: list[Entry] = []
    chunks: list[tuple[bytes, int]] = []

    def write_pack(w: PackWriter) -> None:
        store.install_pack(w)

    for i in range(n_chunks):
        data = i.to_bytes(8, "little") * 8
        cid = content_id(data)
        writer.add(cid, store.codec.encode(cid, data), len(data))
        chunks.append((cid, len(data)))
        if len(chunks) == CHUNKS_PER_ENTRY:
            entries.append(Entry(path=b"f%09d" % len(entries), type=EntryType.FILE,
                                 size=len(chunks) * 64, chunks=chunks, content_hash=cid))
            chunks = []
        if writer.size >= store.config.pack_size:
            write_pack(writer)
            writer = store.new_pack_writer()
    if chunks:
        entries.append(Entry(path=b"f%09d" % len(entries), type=EntryType.FILE,
                             size=len(chunks) * 64, chunks=chunks, content_hash=chunks[0][0]))
    if writer.entries:
        write_pack(writer)
    manifest = b"".join(encode_manifest(entries))
    ids = []
    for piece in store.chunker.cut(manifest):
        cid = content_id(piece)
        store.store_chunk(cid, piece)
        ids.append((cid.hex(), len(piece)))
    store.flush()
    snap = Snapshot(time=now_iso(), host="synthetic", paths=["/synthetic"], manifest=ids,
                    manifest_id=content_id(manifest).hex(),
                    stats={"files": len(entries), "bytes_total": n_chunks * 64})
    sid = snap.compute_id()
    store.backend.save("snapshots", sid, store.cipher.seal(snap.to_bytes(), SNAPSHOT_AAD))
    store.close()


def peak_rss(args: list[str], work: Path) -> tuple[float, float, int]:
    """Run a command; return (wall seconds, peak RSS in MiB, exit code).

    Measured by GNU time: a child forked from this (large) process would inherit its
    RSS high-water mark and report it instead of its own.
    """
    report = work / "rss.txt"
    t = time.monotonic()
    rc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), *args],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        env={**os.environ, "STRATA_NO_PROGRESS": "1"}).returncode
    return time.monotonic() - t, int(report.read_text().split()[-1]) / 1024, rc


def measure(store: Path, small_tree: Path, work: Path) -> dict[str, dict]:
    exe = str(Path(sys.executable).with_name("strata"))
    runs = {"check": ["store", "check", str(store)],
            "backup (small tree)": ["store", "backup", str(store), str(small_tree)],
            "prune --dry-run": ["store", "prune", str(store), "--dry-run"],
            "stats": ["store", "stats", str(store)]}
    out = {}
    for name, args in runs.items():
        wall, rss, rc = peak_rss([exe, *args], work)
        out[name] = {"seconds": round(wall, 1), "peak_rss_mib": round(rss, 1), "exit": rc}
    return out


def run(chunks: int, work: Path) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t = time.monotonic()
    synthesize_store(work / "store", chunks)
    print(f"synthesized {chunks} chunks in {time.monotonic() - t:.0f}s", flush=True)
    tree = work / "tree"
    shutil.copytree(Path(__file__).parent.parent / "src", tree)
    result = {"chunks": chunks, "command": f"python -m bench.scale --chunks {chunks}",
              "runs": measure(work / "store", tree, work)}
    (Path(__file__).parent / "scale-results.json").write_text(
        json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chunks", type=int, default=10_000_000)
    ap.add_argument("--work", type=Path, default=Path("bench/work/scale"))
    args = ap.parse_args()
    print(json.dumps(run(args.chunks, args.work), indent=2))


if __name__ == "__main__":
    main()
